# Stand-in for Slicer's SlicerExtensionGenerateConfig.cmake: Slicer writes a
# <ExtensionName>Config.cmake for other extensions to find; nothing here needs it.
if("${EXTENSION_NAME}" STREQUAL "")
  message(FATAL_ERROR "EXTENSION_NAME is not set")
endif()
