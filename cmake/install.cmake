# Install rules: headers, the exported INTERFACE target and a package config,
# so that find_package(kvcache CONFIG REQUIRED) works after cmake --install.
include(CMakePackageConfigHelpers)

set(KVCACHE_CMAKE_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/kvcache")

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/kvcache"
        DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(TARGETS kvcache EXPORT kvcacheTargets)
install(EXPORT kvcacheTargets NAMESPACE kvcache:: DESTINATION "${KVCACHE_CMAKE_DIR}")

configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/kvcacheConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/kvcacheConfig.cmake"
  INSTALL_DESTINATION "${KVCACHE_CMAKE_DIR}")
# The library is header-only, so any architecture may use it.
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/kvcacheConfigVersion.cmake"
  COMPATIBILITY SameMajorVersion ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/kvcacheConfig.cmake"
              "${PROJECT_BINARY_DIR}/kvcacheConfigVersion.cmake"
        DESTINATION "${KVCACHE_CMAKE_DIR}")
