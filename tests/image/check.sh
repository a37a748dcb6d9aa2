#!/bin/sh
# Waits for systemd to finish starting, then reports on the console in one write.
# The test's seed writes this file (cloud-init write_files, the only module the image
# runs); the QA image's edgepin-qa-check.service runs it.
TPM=device:/dev/tpmrm0
ENROLLED_INDEX=0x0100E9D0
systemctl is-system-running --wait >/dev/null 2>&1
cloud_cfg=$(python3 -c '
from cloudinit import util
c = util.read_conf_with_confd("/etc/cloud/cloud.cfg")
keys = ("cloud_init_modules", "cloud_config_modules", "cloud_final_modules")
print(" ".join(",".join(map(str, c.get(k) or [])) or "-" for k in keys))
print(",".join(c.get("datasource_list") or []))
print(c.get("allow_userdata"), (c.get("vendor_data") or {}).get("enabled"), (c.get("vendor_data2") or {}).get("enabled"))
' 2>&1)
# what the package made under the tmpfs mounts, seen through a bind mount of /var
mkdir -p /run/edgepin-qa/var && mount --bind /var /run/edgepin-qa/var
disk_modes="$(stat -c '%a %U:%G' /run/edgepin-qa/var/lib/libvirt/qemu),$(stat -c '%a %U:%G' /run/edgepin-qa/var/log/libvirt)"
umount /run/edgepin-qa/var
# cloud-init's services that lack the gate (an empty list is the answer wanted)
ungated=""
units=""
for u in $(systemctl list-unit-files --type=service --no-legend 'cloud-*' | awk '{print $1}'); do
    case "$u" in *@.service) continue ;; esac
    units="$units,$u"
    systemctl show -p ExecCondition --value "$u" | grep -q /usr/lib/edgepin-host/cloud-init-gate \
        || ungated="$ungated,$u"
done
# the guest networks: br0 filters VLANs and its uplink carries them (VLAN 1 untagged, as
# the PVID); brhost holds the host's address, with nothing forwarded to the site; and a
# throwaway domain with two ports on br0, one in VLAN 42 (as a guest of an image published
# with vlan:42), which libvirt makes an untagged member of VLAN 42 and of nothing else, and
# one as a lan guest's, an untagged member of VLAN 1 only
uplink=$(ls /sys/class/net/br0/brif 2>/dev/null | grep -v '^vnet' | head -1)
vlan_probe=$(python3 - <<'PY' 2>&1 | tail -1
import json, subprocess, time
import libvirt
from xml.etree import ElementTree as ET
conn = libvirt.open("qemu:///system")
dom = conn.createXML("""<domain type='qemu'><name>edgepin-qa-vlan</name>
<memory unit='MiB'>32</memory><os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><interface type='bridge'><source bridge='br0'/><vlan><tag id='42'/></vlan>
<model type='virtio'/></interface><interface type='bridge'><source bridge='br0'/>
<model type='virtio'/></interface></devices></domain>""", 0)
try:
    ports = []
    for iface in ET.fromstring(dom.XMLDesc(0)).findall("devices/interface"):
        tap = iface.find("target").get("dev")
        out = subprocess.run(["bridge", "-j", "vlan", "show", "dev", tap],
                             capture_output=True, text=True, check=True).stdout
        vlans = [v for port in json.loads(out) for v in port["vlans"]]
        ports.append(",".join(f"{v['vlan']}:{'+'.join(v.get('flags', []))}" for v in vlans) or "-")
    print(" ".join(ports))
finally:
    dom.destroy()
PY
)
report=$(
echo "EDGEPIN-CHECK system=$(systemctl is-system-running)"
echo "EDGEPIN-CHECK failed=$(systemctl list-units --failed --plain --no-legend | awk '{print $1}' | paste -sd, -)"
echo "EDGEPIN-CHECK root=$(findmnt -no OPTIONS / | cut -d, -f1)"
# the root is the dm-verity device the initramfs opened: its status (V: verified so far,
# C: a corrupted block was seen) and what it does on corruption
echo "EDGEPIN-CHECK root-source=$(findmnt -no SOURCE /)"
echo "EDGEPIN-CHECK root-fstype=$(findmnt -no FSTYPE /)"
# the GPT partitions under it (data and hash tree): the root slot the command line names
echo "EDGEPIN-CHECK root-partitions=$(for d in $(dmsetup deps -o devname edgepin-root | grep -o '([a-z0-9]*)' | tr -d '()'); do sed -n 's/^PARTNAME=//p' "/sys/class/block/$d/uevent"; done | sort | paste -sd, -)"
# the boot partition (kernel, initramfs, grub.cfg) is not mounted on the running node
echo "EDGEPIN-CHECK boot-mounted=$(findmnt -rn -o TARGET | grep -cx /boot)"
echo "EDGEPIN-CHECK verity=$(dmsetup status edgepin-root 2>&1 | awk '{print $3, $4}') $(dmsetup table edgepin-root 2>&1 | grep -o panic_on_corruption)"
echo "EDGEPIN-CHECK var=$(findmnt -no FSTYPE /var) $(df -BM --output=size /var | tail -1 | tr -d ' ')"
echo "EDGEPIN-CHECK etc=$(findmnt -no FSTYPE /etc)"
# the vault: every folder of it encrypted under one key, which the filesystem holds; the
# journal was flushed into it
echo "EDGEPIN-CHECK vault=$(systemctl is-active edgepin-vault.service) $(python3 -c '
from pathlib import Path
from provisioner.node import fscrypt, vault
ids = {fscrypt.policy_identifier(Path("/") / d) for d in vault.VAULT_DIRS}
print(len(ids), "plain" if None in ids else "encrypted")
' 2>&1)"
# systemd breaks an ordering cycle by dropping a job, and says so only in the journal
echo "EDGEPIN-CHECK ordering-cycles=$(journalctl -b -o cat | grep -ci 'ordering cycle')"
echo "EDGEPIN-CHECK journal-files=$(find /var/log/journal -name '*.journal' | wc -l)"
echo "EDGEPIN-CHECK state-features=$(tune2fs -l "$(findmnt -no SOURCE /var)" 2>&1 | sed -n 's/^Filesystem features: *//p' | tr ' ' '\n' | grep -cx encrypt)"
echo "EDGEPIN-CHECK etc-upper=$(findmnt -no OPTIONS /etc | tr , '\n' | sed -n 's/^upperdir=//p') $(stat -f -c %T /run/edgepin-host/etc)"
echo "EDGEPIN-CHECK listen22=$(awk '$4 == "0A" && $2 ~ /:0016$/' /proc/net/tcp /proc/net/tcp6 | wc -l)"
echo "EDGEPIN-CHECK tpm0=$(test -c /dev/tpm0 && echo yes || echo no)"
echo "EDGEPIN-CHECK libvirtd=$(systemctl is-active libvirtd)"
echo "EDGEPIN-CHECK edgepin=$(edgepin --version 2>&1 | head -1)"
echo "EDGEPIN-CHECK root-login=$(passwd -S root | awk '{print $2}')"
echo "EDGEPIN-CHECK compilers=$(for t in gcc cc make; do command -v $t; done | wc -l)"
echo "EDGEPIN-CHECK machine-id=$(cat /etc/machine-id)"
echo "EDGEPIN-CHECK machine-id-kept=$(cat /var/lib/edgepin-host/machine-id 2>&1)"
echo "EDGEPIN-CHECK cloud-modules=$(echo "$cloud_cfg" | sed -n 1p)"
echo "EDGEPIN-CHECK cloud-datasources=$(echo "$cloud_cfg" | sed -n 2p)"
echo "EDGEPIN-CHECK cloud-userdata=$(echo "$cloud_cfg" | sed -n 3p)"
echo "EDGEPIN-CHECK cloud-units=${units#,}"
echo "EDGEPIN-CHECK cloud-ungated=${ungated#,}"
echo "EDGEPIN-CHECK cloud-gate=$(cat /run/edgepin-host/cloud-init 2>&1)"
# the seed's user-data and vendor-data hold a boothook, a script, bootcmd, runcmd and
# write_files: each would leave a file
echo "EDGEPIN-CHECK seed-commands=$(ls /run/edgepin-qa/ | grep ran | paste -sd, -)"
# every edgepin unit's Documentation= names a file that is on the image
echo "EDGEPIN-CHECK unit-docs-missing=$(for u in edgepin-vault.service edgepin-enroll.service edgepin-reconcile.service edgepin-reconcile.timer; do for d in $(systemctl show -p Documentation --value "$u"); do [ -f "${d#file://}" ] || echo "$u:$d"; done; done | paste -sd, -)"
# the reconcile timer as systemd loaded it (the image tier builds it with 20s and 10s)
echo "EDGEPIN-CHECK reconcile-timer=$(systemctl show -p TimersMonotonic --value edgepin-reconcile.timer | grep -o 'OnUnitActiveUSec=[^ ;]*') $(systemctl show -p RandomizedDelayUSec --value edgepin-reconcile.timer)"
echo "EDGEPIN-CHECK gettys=$(systemctl list-units --type=service --state=active --plain --no-legend '*getty*' | awk '{print $1}' | paste -sd, -)"
echo "EDGEPIN-CHECK getty-ttyS0=$(systemctl is-enabled serial-getty@ttyS0.service 2>&1)"
echo "EDGEPIN-CHECK setuid=$(find / /var -xdev -type f -user root -perm -4000 2>/dev/null | sort -u | paste -sd, -)"
echo "EDGEPIN-CHECK libvirt-qemu=$(findmnt -no FSTYPE /var/lib/libvirt/qemu) $(stat -c '%a %U:%G' /var/lib/libvirt/qemu)"
echo "EDGEPIN-CHECK libvirt-log=$(findmnt -no FSTYPE /var/log/libvirt) $(stat -c '%a %U:%G' /var/log/libvirt)"
echo "EDGEPIN-CHECK libvirt-on-disk=$disk_modes"
# what the firmware and GRUB measured (GRUB: commands and kernel command line into 8,
# files into 9), as 4=hex,7=hex,8=hex,9=hex
echo "EDGEPIN-CHECK pcrs=$(tpm2_pcrread -T "$TPM" sha256:4,7,8,9 2>&1 | awk '$2 == ":" && $3 ~ /^0x/ {printf "%s%s=%s", sep, $1, tolower(substr($3, 3)); sep = ","}')"
# GRUB's menu: a superuser, no password command, Linux entries unrestricted
# (read here from the boot partition, mounted read-only for the check and unmounted after)
bootdir=$(mktemp -d)
mount -o ro,nodev,nosuid,noexec /dev/disk/by-partlabel/boot "$bootdir"
cp "$bootdir/grub/grub.cfg" /run/edgepin-check-grub.cfg
umount "$bootdir"
rmdir "$bootdir"
cfg=/run/edgepin-check-grub.cfg
echo "EDGEPIN-CHECK grub-superusers=$(sed -n 's/^set superusers=//p' "$cfg" | paste -sd, -)"
echo "EDGEPIN-CHECK grub-passwords=$(grep -cE '^\s*password(_pbkdf2)?\s' "$cfg")"
echo "EDGEPIN-CHECK grub-linux-entries=$(grep -cE '^\s*menuentry .*--class gnu-linux' "$cfg")"
echo "EDGEPIN-CHECK grub-restricted-linux-entries=$(grep -E '^\s*menuentry .*--class gnu-linux' "$cfg" | grep -cv -- --unrestricted)"
echo "EDGEPIN-CHECK grub-recovery-entries=$(grep -c 'recovery mode' "$cfg")"
echo "EDGEPIN-CHECK cmdline=$(cat /proc/cmdline)"
# Secure Boot as the firmware says (the variable's last byte: 1 enforced), and the
# kernel's lockdown mode (Debian's kernel locks itself down under Secure Boot)
sb=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c
echo "EDGEPIN-CHECK secureboot=$(if [ -e "$sb" ]; then od -An -tu1 -j4 -N1 "$sb" | tr -d ' '; else echo none; fi)"
echo "EDGEPIN-CHECK lockdown=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/security/lockdown 2>/dev/null || echo none)"
# what is on the ESP: the signed chain only
echo "EDGEPIN-CHECK esp=$(cd /boot/efi && find EFI -type f | sort | paste -sd, -)"
# last, as the node at enrollment: with the enrollment NV index in the TPM, the gate says
# no and a cloud-init unit started again is skipped
rm -f /run/edgepin-host/cloud-init
tpm2_nvdefine -T "$TPM" -C o -s 8 -a "ownerread|ownerwrite" "$ENROLLED_INDEX" >/dev/null 2>&1
/usr/lib/edgepin-host/cloud-init-gate >/dev/null 2>&1
echo "EDGEPIN-CHECK enrolled-gate=$? $(cat /run/edgepin-host/cloud-init 2>&1)"
timeout 60 systemctl restart cloud-final.service >/dev/null 2>&1
echo "EDGEPIN-CHECK enrolled-cloud-final=$(systemctl show -p Result --value cloud-final.service)"
tpm2_nvundefine -T "$TPM" -C o "$ENROLLED_INDEX" >/dev/null 2>&1
echo "EDGEPIN-CHECK br0-vlan-filtering=$(cat /sys/class/net/br0/bridge/vlan_filtering 2>&1)"
# as ranges of VLANs with the same flags (iproute2's JSON lists each VLAN on its own)
echo "EDGEPIN-CHECK uplink-vlans=$uplink $(bridge -j vlan show dev "$uplink" 2>&1 | python3 -c '
import json, sys
ranges = []
for port in json.load(sys.stdin):
    for v in port["vlans"]:
        first, last = v["vlan"], v.get("vlanEnd", v["vlan"])
        flags = "+".join(v.get("flags", [])) or "tagged"
        if ranges and ranges[-1][2] == flags and ranges[-1][1] + 1 == first:
            ranges[-1][1] = last
        else:
            ranges.append([first, last, flags])
print(",".join(f"{a} {b} {f}" for a, b, f in ranges))
' 2>&1)"
echo "EDGEPIN-CHECK guest-vlan-port=$vlan_probe"
echo "EDGEPIN-CHECK brhost=$(ip -4 -o addr show dev brhost 2>&1 | awk '{print $4}')"
echo "EDGEPIN-CHECK ip-forward=$(cat /proc/sys/net/ipv4/ip_forward)"
echo "EDGEPIN-CHECK-END"
)
printf '\n%s\n' "$report" >/dev/console
