# Hardening defaults (see README.rst).
# keep documentation, man pages and translations out of the image
export DIB_EDGEPIN_STRIP_DOCS=${DIB_EDGEPIN_STRIP_DOCS:-1}
# leave out kernel modules for sound, radio, media, ISDN and staging
export DIB_EDGEPIN_TRIM=${DIB_EDGEPIN_TRIM:-1}
