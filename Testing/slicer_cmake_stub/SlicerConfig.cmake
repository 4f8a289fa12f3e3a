# A stand-in "Slicer" package for configuring the RadGSReg extension in RadGSReg's tests
# (Testing/test_slicer_extension_build.py): cmake -DSlicer_DIR=<this folder> <repository>.
# It defines only what the extension's CMakeLists.txt files use; it builds nothing and
# runs no Slicer code. The scripted-module macros it provides (SlicerScriptedModuleRules.cmake)
# apply the file rules of Slicer's and CTK's macros, which is what the tests check.

set(Slicer_VERSION_MAJOR 5)
set(Slicer_VERSION_MINOR 8)
set(Slicer_USE_PYTHONQT ON)

# The scripted-modules folder of an extension build tree, relative to its build folder, and its
# install location (as in a Slicer 5.8 build on Linux).
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-${Slicer_VERSION_MAJOR}.${Slicer_VERSION_MINOR}/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")

# Stand-ins for Slicer's own README and licence: UseSlicer's defaults of EXTENSION_README_FILE
# and EXTENSION_LICENSE_FILE when an extension sets neither.
set(Slicer_README_FILE "${CMAKE_CURRENT_LIST_DIR}/Slicer-README.txt")
set(Slicer_LICENSE_FILE "${CMAKE_CURRENT_LIST_DIR}/Slicer-LICENSE.txt")

set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionGenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionCPack.cmake")

include("${CMAKE_CURRENT_LIST_DIR}/SlicerScriptedModuleRules.cmake")
