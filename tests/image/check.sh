#!/bin/sh
# Waits for systemd to finish starting, then reports on the console in one write.
# /dev/console, not /dev/ttyS0: serial-getty's vhangup of ttyS0 as it starts would cut a
# writer that holds ttyS0 open (a race seen on a fast boot); the console survives it.
systemctl is-system-running --wait >/dev/null 2>&1
report=$(
echo "EDGEPIN-CHECK system=$(systemctl is-system-running)"
echo "EDGEPIN-CHECK failed=$(systemctl list-units --failed --plain --no-legend | awk '{print $1}' | paste -sd, -)"
echo "EDGEPIN-CHECK root=$(findmnt -no OPTIONS / | cut -d, -f1)"
echo "EDGEPIN-CHECK var=$(findmnt -no FSTYPE /var) $(df -BM --output=size /var | tail -1 | tr -d ' ')"
echo "EDGEPIN-CHECK etc=$(findmnt -no FSTYPE /etc)"
echo "EDGEPIN-CHECK listen22=$(awk '$4 == "0A" && $2 ~ /:0016$/' /proc/net/tcp /proc/net/tcp6 | wc -l)"
echo "EDGEPIN-CHECK tpm0=$(test -c /dev/tpm0 && echo yes || echo no)"
echo "EDGEPIN-CHECK libvirtd=$(systemctl is-active libvirtd)"
echo "EDGEPIN-CHECK edgepin=$(edgepin --version 2>&1 | head -1)"
echo "EDGEPIN-CHECK root-login=$(passwd -S root | awk '{print $2}')"
echo "EDGEPIN-CHECK compilers=$(for t in gcc cc make; do command -v $t; done | wc -l)"
echo "EDGEPIN-CHECK machine-id=$(cat /etc/machine-id)"
echo "EDGEPIN-CHECK-END"
)
printf '\n%s\n' "$report" >/dev/console
