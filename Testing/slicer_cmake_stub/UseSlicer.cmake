# Stand-in for Slicer's UseSlicer.cmake (CMake/UseSlicer.cmake.in, Slicer v5.8.0): the
# extension defaults that matter here. EXTENSION_NAME defaults to the project name;
# EXTENSION_DEPENDS to NA; EXTENSION_README_FILE and EXTENSION_LICENSE_FILE, when the
# extension sets neither, to Slicer's own files (here the stand-ins next to this file).

if(NOT DEFINED EXTENSION_NAME)
  set(EXTENSION_NAME ${PROJECT_NAME})
endif()
if(NOT DEFINED EXTENSION_DEPENDS)
  set(EXTENSION_DEPENDS NA)
endif()
if(NOT DEFINED EXTENSION_README_FILE)
  set(EXTENSION_README_FILE ${Slicer_README_FILE})
endif()
if(NOT DEFINED EXTENSION_LICENSE_FILE)
  set(EXTENSION_LICENSE_FILE ${Slicer_LICENSE_FILE})
endif()

if(BUILD_TESTING)
  enable_testing()
endif()
