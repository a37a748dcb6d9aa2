"""A tiny guest disk image built from Debian packages: nothing prebuilt is downloaded.

Debian's cloud kernel (from ``apt-get download``) and a busybox initramfs go on a FAT
partition of an MBR disk booted by syslinux, all without mounting anything (mkfs.vfat
--offset, mcopy, ``syslinux --offset``). The guest prints ``EDGEPIN-GUEST-MARKER
<marker>`` on its serial console, then keeps running (``run``), powers off (``poweroff``)
or panics (``panic``). Given ``net_url``, a running guest also loads Debian's virtio-net
modules from the same kernel package, takes an address by DHCP on ``eth0`` (busybox's
udhcpc) and asks ``<net_url>/<marker>/<its address>`` until that works (an HTTP/1.0 GET
through busybox's nc: its wget crashed in this initramfs): the server behind ``net_url``
sees that the guest got an address and reached it.

Two guests without a kernel, for the image tier, where a Linux boot under emulation inside
emulation takes minutes: an iPXE guest (Debian's ipxe package, a script as its initrd) and
a bare guest (a boot sector that prints the marker and halts); both are below.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.parse
from pathlib import Path

MARKER_PREFIX = "EDGEPIN-GUEST-MARKER"
PART_OFFSET = 1024 * 1024
DISK_MIB = 48
BEHAVIOURS = ("run", "poweroff", "panic")
# the virtio PCI network driver and what it needs (all modules in Debian's cloud kernel),
# in loading order
NET_MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)
# busybox udhcpc calls this with the lease in its environment
DHCP_SCRIPT = """#!/bin/busybox sh
case "$1" in
bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
    [ -n "$router" ] && route add default gw "${router%% *}" dev "$interface"
    echo "$ip" > /addr
    ;;
esac
exit 0
"""


def _run(args: list[str], cwd: Path | None = None) -> bytes:
    r = subprocess.run(args, cwd=cwd, capture_output=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {r.stderr.decode(errors='replace')}")
    return r.stdout


def kernel_package(cache_dir: Path) -> Path:
    """The Debian cloud kernel package, downloaded once into the cache."""
    debs = cache_dir / "guest-debs"
    debs.mkdir(parents=True, exist_ok=True)
    # the image tier and the other tiers run at once (./build.sh test) and share the
    # cache: one downloads, the other waits for it and finds the package
    with (debs / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _kernel_package(debs)


def _kernel_package(debs: Path) -> Path:
    found = sorted(debs.glob("linux-image-*-cloud-amd64_*.deb"))
    if found:
        return found[-1]
    depends = _run(["apt-cache", "depends", "linux-image-cloud-amd64"]).decode()
    names = [
        line.split(":", 1)[1].strip()
        for line in depends.splitlines()
        if line.strip().startswith("Depends: linux-image-")
    ]
    if not names:
        raise RuntimeError("cannot resolve linux-image-cloud-amd64")
    _run(["apt-get", "download", names[0]], cwd=debs)
    found = sorted(debs.glob("linux-image-*-cloud-amd64_*.deb"))
    if not found:
        raise RuntimeError("apt-get download gave no kernel package")
    return found[-1]


def extract_vmlinuz(deb: Path, out: Path) -> None:
    data = _run(["dpkg-deb", "--fsys-tarfile", str(deb)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.name.startswith("./boot/vmlinuz-"):
                f = tar.extractfile(member)
                assert f is not None
                out.write_bytes(f.read())
                return
    raise RuntimeError(f"no vmlinuz in {deb}")


def net_modules(deb: Path) -> dict[str, bytes]:
    """The network modules (NET_MODULES) from the kernel package, by name."""
    data = _run(["dpkg-deb", "--fsys-tarfile", str(deb)])
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name.endswith(".ko") and name.removesuffix(".ko") in NET_MODULES:
                f = tar.extractfile(member)
                assert f is not None
                found[name.removesuffix(".ko")] = f.read()
    missing = [m for m in NET_MODULES if m not in found]
    if missing:
        raise RuntimeError(f"{deb.name} has no uncompressed {', '.join(missing)} module")
    return found


def net_script(marker: str, net_url: str) -> str:
    """Bring eth0 up by DHCP and tell ``net_url`` the address, until it answers."""
    modules = " ".join(NET_MODULES)
    url = urllib.parse.urlsplit(net_url)
    host, port = url.hostname, url.port
    return (
        "net() {\n"
        f"    for m in {modules}; do insmod /lib/$m.ko 2>/dev/null; done\n"
        "    ifconfig lo up; ifconfig eth0 up || return 1\n"
        "    udhcpc -i eth0 -s /bin/dhcp -n -q -t 5 -T 2 >/dev/null 2>&1 || return 1\n"
        "    addr=$(cat /addr)\n"
        f"    printf 'GET /{marker}/%s HTTP/1.0\\r\\n\\r\\n' \"$addr\" | nc -w 10 {host} {port}"
        " | grep -q '^HTTP/1.. 200' || return 1\n"
        '    say "network: $addr reached the test service"\n'
        "}\n"
        "( n=0; while [ $n -lt 60 ] && ! net; do n=$((n+1)); sleep 5; done ) &\n"
    )


def init_script(marker: str, behaviour: str, net_url: str | None = None) -> str:
    tail = {
        "run": 'n=0\nwhile true; do n=$((n+1)); say "heartbeat $n"; sleep 5; done\n',
        "poweroff": "sleep 1\npoweroff -f\n",
        "panic": "exit 1\n",
    }[behaviour]
    return (
        "#!/bin/busybox sh\n"
        "/bin/busybox --install -s /bin\n"
        "mount -t proc proc /proc\nmount -t sysfs sys /sys\n"
        "mount -t devtmpfs dev /dev 2>/dev/null\n"
        'say() { echo "$*" > /dev/ttyS0; }\n'
        f'say "{MARKER_PREFIX} {marker}"\n'
        + (net_script(marker, net_url) if net_url and behaviour == "run" else "")
        + tail
    )


def _cpio_newc(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A newc cpio archive (deterministic: fixed mtimes and inode numbers)."""
    out = io.BytesIO()
    ino = 1
    for name, (mode, data) in [*sorted(files.items()), ("TRAILER!!!", (0, b""))]:
        nlink = 2 if mode & 0o040000 else 1
        header = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        )
        out.write(header.encode() + name.encode() + b"\0")
        out.write(b"\0" * ((4 - out.tell() % 4) % 4))
        out.write(data)
        out.write(b"\0" * ((4 - out.tell() % 4) % 4))
        ino += 1
    return out.getvalue()


def build_initramfs(
    marker: str, behaviour: str, net_url: str | None = None, modules: dict[str, bytes] | None = None
) -> bytes:
    busybox = Path("/bin/busybox").read_bytes()
    files = {
        "bin": (0o040755, b""),
        "dev": (0o040755, b""),
        "proc": (0o040755, b""),
        "sys": (0o040755, b""),
        "bin/busybox": (0o100755, busybox),
        "init": (0o100755, init_script(marker, behaviour, net_url).encode()),
    }
    if net_url:
        files["lib"] = (0o040755, b"")
        files["bin/dhcp"] = (0o100755, DHCP_SCRIPT.encode())
        for name, data in (modules or {}).items():
            files[f"lib/{name}.ko"] = (0o100644, data)
    return gzip.compress(_cpio_newc(files), mtime=0)


def build_tiny_guest(
    cache_dir: Path, out: Path, marker: str, behaviour: str = "run", net_url: str | None = None
) -> Path:
    """Build the bootable qcow2 (cached by marker, behaviour, network URL and kernel)."""
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour must be one of {BEHAVIOURS}")
    deb = kernel_package(cache_dir)
    key = hashlib.sha256(
        f"{marker}\0{behaviour}\0{net_url}\0{deb.name}\0{NET_MODULES}\0v5".encode()
    ).hexdigest()[:16]
    cached = cache_dir / "guest-images" / f"{key}.qcow2"
    if not cached.exists():
        with tempfile.TemporaryDirectory(prefix="edgepin-guest-") as tmp:
            t = Path(tmp)
            extract_vmlinuz(deb, t / "vmlinuz")
            modules = net_modules(deb) if net_url else None
            (t / "initrd.gz").write_bytes(build_initramfs(marker, behaviour, net_url, modules))
            _syslinux_disk(
                t,
                "vmlinuz",
                "initrd.gz",
                "console=ttyS0,115200 panic=-1 quiet",
                cached,
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out)
    return out


def _syslinux_disk(t: Path, kernel: str, initrd: str, append: str, cached: Path) -> None:
    """An MBR disk with one FAT partition holding ``t/kernel`` and ``t/initrd``, booted by
    syslinux (its own lines on the first serial port), written as qcow2 to ``cached``."""
    (t / "syslinux.cfg").write_text(
        "serial 0 115200\ndefault guest\nprompt 0\ntimeout 1\n"
        f"label guest\n  kernel /{kernel}\n  initrd /{initrd}\n  append {append}\n"
    )
    raw = t / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(DISK_MIB * 1024 * 1024)
    subprocess.run(
        ["sfdisk", "-q", str(raw)], input=b"2048,,c,*\n", check=True, capture_output=True
    )
    sectors = PART_OFFSET // 512
    _run(
        [
            "mkfs.vfat",
            "--offset",
            str(sectors),
            "-n",
            "GUEST",
            "--invariant",
            str(raw),
            str((DISK_MIB - 1) * 1024),
        ]
    )
    image = f"{raw}@@{PART_OFFSET}"
    for name in (kernel, initrd, "syslinux.cfg"):
        _run(["mcopy", "-i", image, str(t / name), f"::{name}"])
    _run(["syslinux", "--offset", str(PART_OFFSET), "--install", str(raw)])
    mbr = Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()
    with raw.open("r+b") as f:
        f.write(mbr[:440])
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = cached.with_suffix(f".tmp{os.getpid()}")
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp_out)])
    tmp_out.replace(cached)


# A guest whose "operating system" is iPXE (Debian's ipxe package: ipxe.lkrn, a network
# boot loader with a DHCP client, HTTP and a script language) booted by syslinux with a
# script as its initrd. iPXE writes to the BIOS console, which the node's guest domain
# sends to the serial port (libvirt's <bios useserial='yes'/>). Under the image tier's
# nested emulation it takes an address and speaks HTTP in a fraction of a Linux boot.
# "leased by": the line a guest prints once it has a lease, followed by the DHCP server.
LEASED_BY = "leased by"


def ipxe_package(cache_dir: Path) -> Path:
    """Debian's ipxe package, downloaded once into the cache."""
    debs = cache_dir / "guest-debs"
    debs.mkdir(parents=True, exist_ok=True)
    with (debs / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(debs.glob("ipxe_*_all.deb"))
        if not found:
            _run(["apt-get", "download", "ipxe"], cwd=debs)
            found = sorted(debs.glob("ipxe_*_all.deb"))
        if not found:
            raise RuntimeError("apt-get download gave no ipxe package")
        return found[-1]


def ipxe_script(marker: str, net: str | None) -> str:
    """The guest's iPXE script. No ``net``: print the marker line. ``host``: take a lease
    (again until one comes), then print the marker line with ``leased by <DHCP server>``.
    A URL: take a lease, then GET ``<url>/<marker>/<its address>`` until it answers (iPXE
    fails a fetch on any status but 2xx), then print the marker line and ``network: <its
    address> reached the test service``. Then it idles (iPXE's sleep, about 2 % of a CPU
    in QEMU's software emulation)."""
    head = f"{MARKER_PREFIX} {marker}"
    if net is None:
        body = f"echo {head}\n"
    elif net == "host":
        body = f":lease\ndhcp net0 || goto lease\necho {head} {LEASED_BY} ${{net0/dhcp-server}}\n"
    else:
        url = net.rstrip("/")
        body = (
            ":lease\n"
            "dhcp net0 || goto lease\n"
            f"echo {head}\n"
            ":reach\n"
            f"imgfetch --name reached {url}/{marker}/${{net0/ip}} || goto again\n"
            "echo network: ${net0/ip} reached the test service\n"
            "goto idle\n"
            ":again\n"
            "sleep 5\n"
            "goto reach\n"
        )
    return "#!ipxe\n" + body + ":idle\nsleep 3600\ngoto idle\n"


def build_ipxe_guest(cache_dir: Path, out: Path, marker: str, net: str | None = None) -> Path:
    """An iPXE guest (above) running :func:`ipxe_script`."""
    deb = ipxe_package(cache_dir)
    script = ipxe_script(marker, net)
    key = hashlib.sha256(f"{deb.name}\0{script}\0ipxe1".encode()).hexdigest()[:16]
    cached = cache_dir / "guest-images" / f"ipxe-{key}.qcow2"
    if not cached.exists():
        with tempfile.TemporaryDirectory(prefix="edgepin-guest-") as tmp:
            t = Path(tmp)
            data = _run(["dpkg-deb", "--fsys-tarfile", str(deb)])
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                f = tar.extractfile("./boot/ipxe.lkrn")
                if f is None:
                    raise RuntimeError(f"no ipxe.lkrn in {deb}")
                (t / "ipxe.lkr").write_bytes(f.read())
            (t / "boot.ipx").write_text(script)
            _syslinux_disk(t, "ipxe.lkr", "boot.ipx", "", cached)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out)
    return out


# A guest with no operating system at all, for scenarios that need only a guest that runs and
# shows its marker: its master boot record sets COM1 to 115200 8N1, writes the marker there
# (waiting for the transmitter each byte) and halts with interrupts off, so the guest's vCPU
# sleeps. Under the image tier's nested emulation it shows its marker in seconds where the
# Linux guest above needs minutes. Assembled from (GNU as, .code16, loaded at 0x7c00):
#   cli; xor ax,ax; mov ds,ax; mov ss,ax; mov sp,0x7c00; cld
#   mov dx,0x3fb; mov al,0x80; out dx,al      line control: divisor latch
#   mov dx,0x3f8; mov al,1; out dx,al         divisor 1: 115200 baud
#   inc dx; xor al,al; out dx,al
#   mov dx,0x3fb; mov al,3; out dx,al         8N1
#   mov si,MESSAGE
# next: lodsb; test al,al; jz halt; mov ah,al; mov dx,0x3fd
# wait: in al,dx; test al,0x20; jz wait; mov dx,0x3f8; mov al,ah; out dx,al; jmp next
# halt: hlt; jmp halt
_BARE_CODE = bytes.fromhex(
    "fa31c08ed88ed0bc007cfcbafb03b080eebaf803b001ee4230c0eebafb03"
    "b003eebe0000ac84c0741288c4bafd03eca82074fbbaf80388e0eeebe9f4"
    "ebfd"
)
_BARE_MESSAGE_IMM = 0x22  # where the code's `mov si, MESSAGE` keeps its operand
_BARE_LOAD = 0x7C00


def bare_boot_sector(marker: str) -> bytes:
    """The 512-byte master boot record of the bare guest that prints ``marker``'s line."""
    message = f"\r\n{MARKER_PREFIX} {marker}\r\n".encode("ascii") + b"\0"
    if len(_BARE_CODE) + len(message) > 446:
        raise ValueError("marker too long for a boot sector")
    code = bytearray(_BARE_CODE)
    code[_BARE_MESSAGE_IMM : _BARE_MESSAGE_IMM + 2] = (_BARE_LOAD + len(code)).to_bytes(2, "little")
    sector = bytes(code) + message
    return sector + b"\0" * (510 - len(sector)) + b"\x55\xaa"


def build_bare_guest(cache_dir: Path, out: Path, marker: str) -> Path:
    """A 1 MiB qcow2 whose boot sector prints the marker line and halts (no kernel)."""
    sector = bare_boot_sector(marker)
    cached = cache_dir / "guest-images" / f"bare-{hashlib.sha256(sector).hexdigest()[:16]}.qcow2"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="edgepin-guest-") as tmp:
            raw = Path(tmp) / "disk.raw"
            with raw.open("wb") as f:
                f.write(sector)
                f.truncate(1024 * 1024)
            tmp_out = cached.with_suffix(f".tmp{os.getpid()}")
            _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp_out)])
            tmp_out.replace(cached)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out)
    return out
