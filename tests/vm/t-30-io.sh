# Data through the device: every block written comes back intact, and a filesystem on top is
# consistent.
# shellcheck shell=bash

# fio job over a whole device: random writes of mixed sizes (large ones: under TCG the cost is
# per request as much as per byte) covering every block once (fio's
# random map), each block carrying a crc32c and its own offset, then a full read-back verify.
fio_verify() { # <device> <job name> [extra fio args]
	local dev=$1 name=$2
	shift 2
	fio --name="$name" --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 \
		--rw=randwrite --bsrange=16k-1m --size=100% --verify=crc32c --do_verify=1 \
		--verify_fatal=1 --verify_backlog=0 --verify_state_save=0 --randseed=1234 --group_reporting \
		--output-format=terse --terse-version=3 "$@" >"$T_TMP/fio.terse" ||
		fail "fio verify on $dev failed: $(tail -n 3 "$T_TMP/fio.terse")"
	# terse v3: field 5 is the job's error code.
	expect_eq "fio error code" 0 "$(cut -d';' -f5 "$T_TMP/fio.terse" | head -n1)"
}

# The whole device, twice the cache: a 512 MiB slice of the pmem (upstream's minimum cache) in front
# of a 1 GiB slice of the backing disk, so writeback and GC run while fio writes.
test_fio_verify_whole_device() {
	ensure_module
	wipe_cache
	local pm back
	pm=$(linear_slice io_pm "$PMEM_DEV" 512)
	back=$(linear_slice io_back "$BACKING_DEV" 1024)
	create io "0 $((1024 * 2048)) $TARGET $pm $back"
	fio_verify "/dev/mapper/${DM_PREFIX}io" whole-device
	dmsetup status "${DM_PREFIX}io"
}

test_fio_verify_data_crc() {
	ensure_module
	wipe_cache
	create io "$(table 4 cache_mode writeback data_crc true)"
	# 128 MiB is enough to exercise the data_crc path (the cache tests cover it further).
	fio_verify "/dev/mapper/${DM_PREFIX}io" data-crc --size=128M
}

test_mkfs_ext4_fsck() {
	ensure_module
	local dev=/dev/mapper/${DM_PREFIX}fs mnt
	wipe_cache
	create fs "$(table)"
	mkfs.ext4 -q -F "$dev"
	fsck.ext4 -fn "$dev"
	mnt=$(mktemp -d -p "$T_TMP")
	mount "$dev" "$mnt"
	for i in $(seq 16); do head -c $((i * 65536)) /dev/urandom >"$mnt/f$i"; done
	sha256sum "$mnt"/f* >"$T_TMP/sums"
	umount "$mnt"
	fsck.ext4 -fn "$dev"
	# Remove and recreate the device: the files are still there and intact.
	dms remove "${DM_PREFIX}fs"
	create fs "$(table)"
	mount "$dev" "$mnt"
	sha256sum -c --quiet "$T_TMP/sums" || fail "file contents changed across remove/create"
	umount "$mnt"
	fsck.ext4 -fn "$dev"
}
