#!/usr/bin/env bash
# Checks the AVX-512, AVX512-BF16 and AMX builds of kernels/csrc on a machine whose CPU has none
# of them: Bochs (patched, see README.md) emulates a Skylake-X and a Sapphire Rapids, each boots
# Debian's kernel with isa_check as its init, and compare.py checks what the run printed against
# the AVX2 build run natively and against torch. About 5 minutes on 2 cores the first time
# (building Bochs), 2 after.
#
#   tests/isa_emulation/run.sh            # both machines
#   tests/isa_emulation/run.sh sapphire_rapids
#
# Needs Debian's packages (installed if missing, as root): g++, bochsbios, vgabios, isolinux,
# syslinux-common, xorriso, cpio; and the project's venv (torch) for compare.py.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=${PAGODA_ISA_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/pagoda/isa-emulation}
python=${PYTHON:-$repo/.venv/bin/python}
machines=("${@:-skylake_x sapphire_rapids}")
mkdir -p "$work"
cd "$work"

# Bochs 3.0 from Debian's source tarball, with our fixes (XFD, tile state, trace cache, bf16)
bochs_tar=bochs_3.0+dfsg.orig.tar.xz
bochs_sha=78f6c73d4a6472d5130a87ab9dc306d02c7c71ed8e25b3a8ef642e2a7acd282b
needed=(g++ make bochsbios vgabios isolinux syslinux-common xorriso cpio)
missing=$(dpkg-query -W -f='${Package} ${Status}\n' "${needed[@]}" 2>&1 |
  grep -v "ok installed" || true)
if [ -n "$missing" ]; then
  apt-get install -y -q "${needed[@]}" > apt.log
fi
if [ ! -x bochs-3.0/bochs ]; then
  pool=http://deb.debian.org/debian/pool/main/b/bochs
  [ -f $bochs_tar ] || curl -sSf -o $bochs_tar "$pool/$bochs_tar"
  echo "$bochs_sha  $bochs_tar" | sha256sum -c --quiet
  rm -rf bochs-3.0 && tar xf $bochs_tar
  (cd bochs-3.0 && patch -s -p1 < "$here/bochs-3.0-pagoda.patch" &&
    ./configure --enable-x86-64 --enable-avx --enable-evex --enable-amx --enable-all-optimizations \
      --enable-pci --with-nogui --disable-debugger --disable-plugins > configure.log 2>&1 &&
    make -j"$(nproc)" > make.log 2>&1)
fi

# Debian's current kernel for this release: any x86-64 kernel with AMX support (5.16 on) does
if [ ! -f vmlinuz ]; then
  image=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  apt-get download -q "$image" > /dev/null 2>&1
  rm -rf kernel && dpkg-deb -x "$image"_*.deb kernel && cp kernel/boot/vmlinuz-* vmlinuz
  rm -rf kernel "$image"_*.deb
fi

# the harness: AVX2 (run here) and AVX-512 (static, the emulated machine's init)
csrc=$repo/kernels/csrc
g++ -O3 -std=c++17 -mavx2 -mfma -mf16c -fopenmp -o isa_check_avx2 "$here/isa_check.cpp" \
  "$csrc"/{linear_cpu,attention_cpu,elementwise_cpu}.cpp
avx512_only=("$csrc"/{linear_bf16,packed_attention_bf16,prefill_attention_amx}.cpp)
g++ -O3 -std=c++17 -mavx512f -mfma -fopenmp -static -o isa_check_avx512 "$here/isa_check.cpp" \
  "$csrc"/{linear_cpu,attention_cpu,elementwise_cpu}.cpp "${avx512_only[@]}" \
  2> >(grep -v "dlopen\|gomp_target_init" >&2)
./isa_check_avx2 > avx2.txt
rm -rf initrd && mkdir initrd && cp isa_check_avx512 initrd/init
(cd initrd && echo init | cpio -o -H newc --quiet > ../initrd.img)

status=0
for machine in ${machines[@]}; do
  case $machine in
    # AVX-512F/BW/DQ/VL, no bf16 arithmetic: the AVX-512 builds of the portable kernels
    skylake_x) model=corei7_skylake_x; args="" ;;
    # AVX512-BF16 and AMX, granted through Linux's arch_prctl as on a real Xeon. FSRM off: with
    # it Linux's boot hangs in Bochs (its fast REP MOVSB); 4-level paging: Bochs's SMM restore
    # refuses LA57
    sapphire_rapids) model=sapphire_rapids; args="clearcpuid=fsrm PAGODA_ISA_AMX=1" ;;
    *) echo "unknown machine $machine" >&2; exit 2 ;;
  esac
  rm -rf "$machine" && mkdir -p "$machine/iso/isolinux" && cd "$machine"
  cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 iso/isolinux/
  cp ../vmlinuz ../initrd.img iso/
  printf 'DEFAULT pg\nPROMPT 0\nTIMEOUT 0\nLABEL pg\n  KERNEL /vmlinuz\n  APPEND %s\n' \
    "initrd=/initrd.img console=ttyS0,115200 loglevel=0 nokaslr no5lvl mitigations=off $args" \
    > iso/isolinux/isolinux.cfg
  xorriso -as mkisofs -o boot.iso -b isolinux/isolinux.bin -c isolinux/boot.cat \
    -no-emul-boot -boot-load-size 4 -boot-info-table iso > xorriso.log 2>&1
  cat > bochsrc <<EOF
megs: 512
cpu: model=$model, count=1, ips=200000000
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/vgabios/vgabios.bin
ata0-master: type=cdrom, path=boot.iso, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=serial.txt
display_library: nogui
log: bochs.log
panic: action=fatal
clock: sync=none, time0=local
EOF
  start=$(date +%s)
  # isa_check powers the machine off when done, which ends Bochs ("soft power off")
  timeout 1800 ../bochs-3.0/bochs -q -f bochsrc > bochs.out 2>&1 || true
  echo "== $machine ($model): $(($(date +%s) - start)) s"
  "$python" "$here/compare.py" ../avx2.txt serial.txt > compare.txt || status=1
  grep -v "same .* bytes" compare.txt
  echo "$(grep -c 'same .* bytes' compare.txt) records bit for bit as the AVX2 build"
  cd ..
done
exit $status
