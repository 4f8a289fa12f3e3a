# Stand-in for Slicer's CMake/SlicerExtensionCPack.cmake (Slicer v5.8.0): that file stops the
# configuration unless EXTENSION_README_FILE and EXTENSION_LICENSE_FILE name existing files
# (they become the package's description file and licence). This stand-in applies the same
# check and records the extension's metadata in <build>/extension_metadata.txt, one
# "NAME=value" line each, for the tests to compare with RadGSReg.s4ext and RadGSReg.json.

foreach(var EXTENSION_README_FILE EXTENSION_LICENSE_FILE)
  if(NOT EXISTS "${${var}}")
    message(FATAL_ERROR "error: ${var} points to an inexistent file: ${${var}}")
  endif()
endforeach()

set(_metadata "")
foreach(var
    EXTENSION_NAME EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS
    EXTENSION_ICONURL EXTENSION_SCREENSHOTURLS EXTENSION_DEPENDS
    EXTENSION_README_FILE EXTENSION_LICENSE_FILE)
  string(REPLACE "\n" " " _value "${${var}}")
  string(APPEND _metadata "${var}=${_value}\n")
endforeach()
file(WRITE "${CMAKE_BINARY_DIR}/extension_metadata.txt" "${_metadata}")
