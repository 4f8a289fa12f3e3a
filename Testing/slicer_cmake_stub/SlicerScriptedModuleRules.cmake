# Stand-ins for Slicer's slicerMacroBuildScriptedModule and slicer_add_python_unittest, for
# RadGSReg's tests. They build nothing; they apply the rules that decide whether a scripted
# module configures and where each of its files ends up in the build tree, and copy the files
# there so that the tests can look at the result.
#
# 1. Existence check -- Slicer v5.8.0 CMake/SlicerMacroBuildScriptedModule.cmake (unchanged on
#    Slicer main). Every SCRIPTS and RESOURCES entry must name something that exists: a
#    relative entry is looked for under the module folder (CMAKE_CURRENT_SOURCE_DIR), as
#    given or with ".py" added; an absolute entry as given. When it is not there, the entry
#    is still accepted if the matching path of the build folder (the relative entry under
#    CMAKE_CURRENT_BINARY_DIR; an absolute entry itself) has the source-file property
#    GENERATED. Anything else stops the configuration with
#    "slicerMacroBuildScriptedModule(<SCRIPTS|RESOURCES>) given nonexistent file or directory".
#
# 2. Where the files go -- CTK CMake/ctkMacroCompilePythonScript.cmake, as called by the macro
#    above (same rules at CTK commit 82cae57, which Slicer v5.8.0 builds, and on CTK main).
#    The destination is <build>/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}, plus /<module folder
#    name> with WITH_SUBDIR; Slicer installs that whole folder.
#    - A script gets ".py" added unless its extension contains "py". A relative script is
#      copied from <module folder>/<entry> to <destination>/<entry>; an absolute one from
#      itself to <destination>/<its path relative to CMAKE_CURRENT_BINARY_DIR>.
#    - A resource is copied from <module folder>/<entry> (an absolute entry: from itself) to
#      <destination>/<the entry exactly as written>, so an absolute entry ends up at a path
#      nested inside the destination that repeats the whole absolute path.
#    CTK copies at build time; these stand-ins copy at configure time, since the tests only
#    need the resulting tree. A copy source that does not exist stops the configuration here
#    (CTK's build would fail: nothing makes that file), unless it is GENERATED (then it is
#    made at build time and skipped here).
#
# 3. slicer_add_python_unittest -- Slicer v5.8.0 CMake/SlicerMacroPythonTesting.cmake. The
#    test imports the script's module by name from the current build folder and from the
#    script's folder (the module folder for a bare file name). The stand-in requires that
#    file to exist already (stricter than Slicer, which only fails when the test runs) and
#    adds a test of the same name, py_[<prefix>]<name>, that only echoes.

function(_radgsreg_stub_copy kind src dst)
  if(IS_DIRECTORY "${src}")
    message(FATAL_ERROR "stand-in slicerMacroBuildScriptedModule: the python ${kind} '${src}' is a directory; CTK copies files only")
  elseif(EXISTS "${src}")
    configure_file("${src}" "${dst}" COPYONLY)
  else()
    get_source_file_property(_generated "${src}" GENERATED)
    if(_generated)
      message(STATUS "stand-in: '${src}' is made at build time; not copied at configure time")
    else()
      message(FATAL_ERROR
        "stand-in slicerMacroBuildScriptedModule: CTK would copy the python ${kind} '${src}' "
        "to '${dst}', but '${src}' does not exist and nothing makes it (the build would fail)")
    endif()
  endif()
endfunction()

function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER
    "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): \"${MY_SLICER_UNPARSED_ARGUMENTS}\"")
  endif()
  if(NOT DEFINED MY_SLICER_NAME)
    message(FATAL_ERROR "NAME is mandatory")
  endif()
  message(STATUS "Configuring Scripted module: ${MY_SLICER_NAME}")

  # 1. existence check
  foreach(kind SCRIPTS RESOURCES)
    foreach(entry IN LISTS MY_SLICER_${kind})
      if(IS_ABSOLUTE "${entry}")
        set(in_module "${entry}")
        set(in_build "${entry}")
      else()
        set(in_module "${CMAKE_CURRENT_SOURCE_DIR}/${entry}")
        set(in_build "${CMAKE_CURRENT_BINARY_DIR}/${entry}")
      endif()
      if(NOT EXISTS "${in_module}" AND NOT EXISTS "${in_module}.py")
        get_source_file_property(generated "${in_build}" GENERATED)
        if(NOT generated)
          message(FATAL_ERROR
            "slicerMacroBuildScriptedModule(${kind}) given nonexistent file or directory '${entry}'")
        endif()
      endif()
    endforeach()
  endforeach()

  if(NOT Slicer_USE_PYTHONQT)
    message(FATAL_ERROR "Attempting to build the Python scripted module '${MY_SLICER_NAME}' when Slicer_USE_PYTHONQT is OFF")
  endif()

  # 2. destination of each file
  set(destination "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
  if(MY_SLICER_WITH_SUBDIR)
    get_filename_component(subdir "${CMAKE_CURRENT_SOURCE_DIR}" NAME)
    string(APPEND destination "/${subdir}")
  endif()

  foreach(entry IN LISTS MY_SLICER_SCRIPTS)
    get_filename_component(extension "${entry}" EXT)
    if(NOT "${extension}" MATCHES "py")
      string(APPEND entry ".py")
    endif()
    if(IS_ABSOLUTE "${entry}")
      set(src "${entry}")
      file(RELATIVE_PATH target "${CMAKE_CURRENT_BINARY_DIR}" "${entry}")
    else()
      set(src "${CMAKE_CURRENT_SOURCE_DIR}/${entry}")
      set(target "${entry}")
    endif()
    _radgsreg_stub_copy(script "${src}" "${destination}/${target}")
  endforeach()

  foreach(entry IN LISTS MY_SLICER_RESOURCES)
    if(IS_ABSOLUTE "${entry}")
      set(src "${entry}")
    else()
      set(src "${CMAKE_CURRENT_SOURCE_DIR}/${entry}")
    endif()
    _radgsreg_stub_copy(resource "${src}" "${destination}/${entry}")
  endforeach()

  # Slicer installs the whole destination folder (its content, without WITH_SUBDIR).
  set(to_install "${destination}")
  if(NOT MY_SLICER_WITH_SUBDIR)
    string(APPEND to_install "/")
  endif()
  install(DIRECTORY "${to_install}" DESTINATION "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"
    USE_SOURCE_PERMISSIONS)

  # WITH_GENERIC_TESTS: Slicer adds generic tests that load the module in Slicer; there is
  # no Slicer to run them here.
endfunction()

function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "TESTNAME_PREFIX;SCRIPT" "SLICER_ARGS" ${ARGN})
  get_filename_component(test_name "${MY_SCRIPT}" NAME_WE)
  get_filename_component(script_dir "${MY_SCRIPT}" PATH)
  if("${script_dir}" STREQUAL "")
    set(script_dir "${CMAKE_CURRENT_SOURCE_DIR}")
  elseif(NOT IS_ABSOLUTE "${script_dir}")
    set(script_dir "${CMAKE_CURRENT_SOURCE_DIR}/${script_dir}")
  endif()
  if(NOT EXISTS "${script_dir}/${test_name}.py")
    message(FATAL_ERROR "slicer_add_python_unittest: the test would import '${test_name}' from '${script_dir}', where there is no ${test_name}.py")
  endif()
  add_test(NAME py_${MY_TESTNAME_PREFIX}${test_name}
    COMMAND "${CMAKE_COMMAND}" -E echo "stand-in for Slicer's unittest of ${test_name}")
endfunction()
