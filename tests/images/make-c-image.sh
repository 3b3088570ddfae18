#!/usr/bin/env bash
# Produce tests/images/c-pcache-1g.img.zst: a pmem image written by the in-tree C dm-pcache
# (target "pcache"), replayed by tests/host/c_image.rs. Run once, in the VM:
#
#   qemu/run-vm --kdir "$(ls -d /var/cache/dm-pcache-rs/build/*-test-*)" --pmem-size 1G \
#       --backing-size 1G --timeout 1500 -- bash tests/images/make-c-image.sh
#
# Pattern (every 512-byte sector S of the device written here holds):
#   bytes 0..8    S as little-endian u64
#   bytes 8..16   the tag "CIMGGEN1" (first write) or "CIMGGEN2" (overwrite)
#   bytes 16..512 byte i = (S + i + G) & 0xff, G = 1 or 2 (the tag's generation)
# Ranges, in 512-byte sectors [start, start+count), written in this order:
#   1. gen 1: 0 +512           (256 KiB at 0, bs=4k)
#   2. gen 1: 204800 +256      (128 KiB at 100 MiB, bs=4k)
#   3. gen 1: 1048584 +128     (64 KiB at 512 MiB + 4 KiB, bs=4k)
#   4. gen 2: 128 +64          (32 KiB at 64 KiB, bs=4k: overwrites part of range 1)
#   5. gen 1: 1843201 +11      (5.5 KiB at 900 MiB + 512, bs=512: unaligned offset and length)
#   6. gen 2: 205000 +7        (3.5 KiB inside range 2, bs=512: unaligned overwrite)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=tests/images
name=cimg
dev=/dev/mapper/$name
zero_mib=128

[ -b "$PMEM_DEV" ] && [ -b "$BACKING_DEV" ] || { echo "PMEM_DEV/BACKING_DEV missing" >&2; exit 1; }
[ -f "$PCACHE_C_KO" ] || { echo "C module not built: $PCACHE_C_KO" >&2; exit 1; }

# The NVDIMM file is fresh (zeros); clear the metadata and first segments anyway.
dd if=/dev/zero of="$PMEM_DEV" bs=1M count=$zero_mib oflag=direct status=none
[ -d /sys/module/dm_pcache ] || insmod "$PCACHE_C_KO"
bsec=$(blockdev --getsz "$BACKING_DEV")
psz=$(blockdev --getsize64 "$PMEM_DEV")
table="0 $bsec pcache $PMEM_DEV $BACKING_DEV 4 cache_mode writeback data_crc true"
dmsetup create --noudevsync "$name" --table "$table"
[ -b "$dev" ] || dmsetup mknodes "$name"

# gen <gen> <start sector> <count> <file>
gen() {
	perl -e '
		my ($g, $s, $n) = @ARGV;
		for my $k ($s .. $s + $n - 1) {
			my $b = pack("Q<", $k) . "CIMGGEN$g";
			$b .= join("", map { chr(($k + $_ + $g) & 0xff) } 16 .. 511);
			print $b;
		}' "$1" "$2" "$3" > "$4"
}
# put <gen> <start sector> <count> <bs>
put() {
	local g=$1 s=$2 n=$3 bs=$4 f
	f=$(mktemp)
	gen "$g" "$s" "$n" "$f"
	dd if="$f" of="$dev" bs="$bs" seek=$((s * 512 / bs)) count=$((n * 512 / bs)) \
		oflag=direct conv=notrunc status=none
	rm -f "$f"
}
put 1 0 512 4096
put 1 204800 256 4096
put 1 1048584 128 4096
put 2 128 64 4096
put 1 1843201 11 512
put 2 205000 7 512
sync
blockdev --flushbufs "$dev"
status=$(dmsetup status "$name")
echo "status: $status"
dmsetup remove "$name"

# The whole device: the C module formats every segment's segment_info, so a prefix
# does not attach. Mostly zeros: zstd stores the zero blocks in a few bytes each.
dd if="$PMEM_DEV" bs=1M status=none | zstd -9 -q -c > "$out/c-pcache-1g.img.zst.new"
mv "$out/c-pcache-1g.img.zst.new" "$out/c-pcache-1g.img.zst"
{
	echo "Produced by tests/images/make-c-image.sh with the in-tree C dm-pcache ($(uname -r))."
	echo "pmem device size: $psz bytes; backing: $bsec sectors"
	echo "image: the whole pmem device ($psz bytes), zstd-compressed"
	echo "table: $table"
	echo "dmsetup status after the writes and a flush, before remove:"
	echo "  $status"
	echo "pattern: see the header of make-c-image.sh (ranges 1-6, gen 1/2 tags)"
} > "$out/c-pcache-1g.txt"
ls -l "$out"
