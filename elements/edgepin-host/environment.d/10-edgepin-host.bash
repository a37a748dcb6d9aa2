# edgepin host image defaults; every value can be overridden from the environment.
export DIB_RELEASE=${DIB_RELEASE:-trixie}
export DIB_DEBIAN_COMPONENTS=${DIB_DEBIAN_COMPONENTS:-main}
# the base element's extras (open-iscsi, ...) have no place on an appliance host
export DIB_SKIP_BASE_PACKAGE_INSTALL=${DIB_SKIP_BASE_PACKAGE_INSTALL:-1}
# cloud-init reads its seed from the NoCloud CIDATA disk and nothing else
export DIB_CLOUD_INIT_DATASOURCES=${DIB_CLOUD_INIT_DATASOURCES:-NoCloud}
# serial console on, for field diagnostics and for the image tests
export DIB_BOOTLOADER_SERIAL_CONSOLE=${DIB_BOOTLOADER_SERIAL_CONSOLE:-ttyS0,115200}
export DIB_BOOTLOADER_DEFAULT_CMDLINE=${DIB_BOOTLOADER_DEFAULT_CMDLINE:-"nofb nomodeset gfxpayload=text ro"}
# set by ./build.sh on a build host without device-mapper or kernel vfat
export DIB_EDGEPIN_HOST_SHIMS=${DIB_EDGEPIN_HOST_SHIMS:-0}
# QA images only (./build.sh image --qa-check): a unit that runs the image test's check
# script, which the test's seed writes; production images have no such unit
export DIB_EDGEPIN_QA_CHECK=${DIB_EDGEPIN_QA_CHECK:-0}
