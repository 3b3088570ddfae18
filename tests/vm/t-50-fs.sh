# Filesystems on top of the cache: ext4 and xfs with a file-level workload (many files, renames,
# deletes, fsync, an fio verify job on files, fstrim) stay consistent (fsck.ext4 -fn / xfs_repair -n clean)
# and keep every file's contents across unmount, device remove/create and mount.
# shellcheck shell=bash
# Uses c_new/c_table from t-40-cache.sh (same suite, same boot).

# f_workload <mountpoint>: files of many sizes, a tree, renames and deletes, fsyncs, an fio job.
f_workload() {
	local mnt=$1 i
	mkdir -p "$mnt/tree/a/b/c" "$mnt/tree/d"
	for i in $(seq 40); do
		head -c $(((i * 37 % 13 + 1) * 24576 + i)) /dev/urandom >"$mnt/tree/a/f$i"
	done
	for i in $(seq 0 3 39); do mv "$mnt/tree/a/f$((i + 1))" "$mnt/tree/a/b/c/g$i"; done
	for i in $(seq 2 5 39); do rm -f "$mnt/tree/a/f$i"; done
	dd if=/dev/urandom of="$mnt/tree/d/big" bs=1M count=24 conv=fsync status=none
	# Overwrite the middle of a file in place.
	dd if=/dev/urandom of="$mnt/tree/d/big" bs=4k seek=1000 count=300 conv=notrunc,fsync status=none
	fio --name=fsjob --directory="$mnt" --nrfiles=8 --filesize=4M --numjobs=2 --rw=randwrite \
		--bsrange=4k-256k --ioengine=psync --fsync=16 --verify=crc32c --verify_fatal=1 \
		--randseed=77 --output-format=terse --terse-version=3 >"$T_TMP/fsfio.terse" ||
		fail "fio on the filesystem failed: $(tail -c 300 "$T_TMP/fsfio.terse")"
	expect_eq "fio error code" 0 "$(grep '^3;' "$T_TMP/fsfio.terse" | cut -d';' -f5 | head -n1)"
	sync
	(cd "$mnt" && find . -type f ! -name 'lost+found' -print0 | sort -z | xargs -0 sha256sum) >"$T_TMP/fs.sums"
	echo "$(wc -l <"$T_TMP/fs.sums") files checksummed"
}

# f_check_sums <mountpoint>
f_check_sums() {
	(cd "$1" && sha256sum -c --quiet "$T_TMP/fs.sums") || fail "file contents changed"
}

# f_fs_test <fs type> <mkfs command...>; F_TABLE_ARGS: optional table arguments of the cache.
f_fs_test() {
	local fs=$1 dev mnt tbl
	shift
	# shellcheck disable=SC2086 # the arguments are words on purpose
	dev=$(c_new "$fs" ${F_TABLE_ARGS:-})
	tbl=$(dmsetup table "${DM_PREFIX}$fs")
	"$@" "$dev" >/dev/null
	mnt=$(mktemp -d -p "$T_TMP")
	mount -t "$fs" "$dev" "$mnt"
	f_workload "$mnt"
	umount "$mnt"
	f_fsck "$fs" "$dev"
	# Remove and create with dirty data in the cache: the filesystem and every file survive.
	dmsetup status "${DM_PREFIX}$fs"
	dms remove "${DM_PREFIX}$fs"
	create "$fs" "$tbl"
	f_fsck "$fs" "$dev"
	mount -t "$fs" "$dev" "$mnt"
	f_check_sums "$mnt"
	# More work on the replayed cache, then a clean unmount.
	rm -rf "$mnt/tree/a/b"
	cp -a "$mnt/tree/d" "$mnt/tree/e"
	sync
	# fstrim: the free space's discards go through the cache (which drops what it holds there).
	f_fstrim "$mnt"
	(cd "$mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$T_TMP/fs.sums"
	umount "$mnt"
	f_fsck "$fs" "$dev"
	mount -t "$fs" "$dev" "$mnt"
	f_check_sums "$mnt"
	umount "$mnt"
}

f_fstrim() { # <mountpoint>
	local out
	out=$(fstrim -v "$1") || fail "fstrim failed: $out"
	echo "$out"
	[[ $out =~ \(([0-9]+)\ bytes\)\ trimmed ]] && [ "${BASH_REMATCH[1]}" -gt 0 ] ||
		fail "fstrim trimmed nothing: $out"
}

f_fsck() { # <fs type> <dev>
	case "$1" in
	ext4) fsck.ext4 -fn "$2" || fail "fsck.ext4 -fn found errors on $2" ;;
	xfs) xfs_repair -n "$2" || fail "xfs_repair -n found errors on $2" ;;
	esac
}

test_cache_fs_ext4() {
	f_fs_test ext4 mkfs.ext4 -q -F
}

# The filesystem test in the other cache modes (ext4).
test_cache_fs_ext4_writethrough() {
	[ "$TARGET" = pcache_rs ] || skip "upstream has only writeback"
	F_TABLE_ARGS="2 cache_mode writethrough" f_fs_test ext4 mkfs.ext4 -q -F
}

test_cache_fs_ext4_writearound() {
	[ "$TARGET" = pcache_rs ] || skip "upstream has only writeback"
	F_TABLE_ARGS="2 cache_mode writearound" f_fs_test ext4 mkfs.ext4 -q -F
}

test_cache_fs_ext4_writeonly() {
	[ "$TARGET" = pcache_rs ] || skip "upstream has only writeback"
	F_TABLE_ARGS="2 cache_mode writeonly" f_fs_test ext4 mkfs.ext4 -q -F
}

test_cache_fs_xfs() {
	command -v mkfs.xfs >/dev/null || skip "mkfs.xfs not installed"
	f_fs_test xfs mkfs.xfs -q -f
}

# A filesystem over a full cache: files of more than the cache's size (576 MiB in a 512 MiB
# cache), written with small and large blocks mixed (512 bytes to 1 MiB, fsyncs among them), so
# requests wait for writeback and GC again and again. Every file reads back through the cache;
# then writeback drains, the cache is removed, and the backing device alone holds every file.
# (This replaced a raw-device working-set test, which checked less.)
F_FULL_MIB=${F_FULL_MIB:-576}
test_cache_fs_full_cache_mixed_writes() {
	local dev mnt tail0 n=8
	dev=$(c_new fsfull)
	tail0=$(c_status fsfull key_tail)
	mkfs.ext4 -q -F "$dev" >/dev/null
	mnt=$(mktemp -d -p "$T_TMP")
	mount -t ext4 "$dev" "$mnt"
	fio --name=full --directory="$mnt" --nrfiles=1 --numjobs="$n" --filesize="$((F_FULL_MIB / n))M" \
		--rw=randwrite --bssplit=512/10:4k/40:64k/30:1m/20 --ioengine=psync --fsync=64 \
		--randseed=55 --verify=crc32c --verify_fatal=1 --verify_backlog=0 --verify_state_save=0 \
		--output-format=terse --terse-version=3 >"$T_TMP/fsfull.terse" ||
		fail "fio on the full cache failed: $(tail -c 300 "$T_TMP/fsfull.terse")"
	expect_eq "fio jobs with an error" 0 "$(grep '^3;' "$T_TMP/fsfull.terse" | cut -d';' -f5 | grep -cv '^0$')"
	sync
	(cd "$mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$T_TMP/fs.sums"
	echo "after ${F_FULL_MIB} MiB of files: $(dmsetup status "${DM_PREFIX}fsfull")"
	[ "$(c_status fsfull key_tail)" != "$tail0" ] ||
		fail "key tail never moved: the files did not overflow the cache"
	umount "$mnt"
	mount -t ext4 "$dev" "$mnt"
	f_check_sums "$mnt"
	umount "$mnt"
	c_wait_drained fsfull 600
	dms remove "${DM_PREFIX}fsfull"
	dms remove "${DM_PREFIX}fsfull_pm"
	f_fsck ext4 "$BACKING_DEV"
	mount -t ext4 -o ro "$BACKING_DEV" "$mnt"
	f_check_sums "$mnt"
	umount "$mnt"
}
