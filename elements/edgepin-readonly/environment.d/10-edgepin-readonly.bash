# GPT with an ESP and a BIOS boot partition: the bootloader element installs
# GRUB for both x86_64-efi and i386-pc when DIB_BLOCK_DEVICE is efi.
export DIB_BLOCK_DEVICE=efi
# the label of the writable state partition (must match block-device-default.yaml)
export DIB_EDGEPIN_STATE_LABEL=${DIB_EDGEPIN_STATE_LABEL:-edgepin-state}
