# Hardening defaults (see README.rst).
# keep documentation, man pages and translations out of the image
export DIB_EDGEPIN_STRIP_DOCS=${DIB_EDGEPIN_STRIP_DOCS:-1}
