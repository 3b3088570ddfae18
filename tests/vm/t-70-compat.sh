# On-media compatibility with the in-tree C dm-pcache (target "pcache"), both ways, in the same
# kernel: data written through one module, the device removed without waiting for writeback, is
# read back byte for byte by the other, which then writes more for the first one to read.
# shellcheck shell=bash
# Uses c_slice/c_fio/c_status from t-40-cache.sh (same suite, same boot).

# Both modules loaded (different target names, so they coexist).
x_modules() {
	[ -f "$PCACHE_C_KO" ] || skip "C dm-pcache module not built ($PCACHE_C_KO)"
	[ -f "$PCACHE_KO" ] || fail "module $PCACHE_KO is not built"
	[ -d /sys/module/dm_pcache ] || insmod "$PCACHE_C_KO"
	[ -d /sys/module/dm_pcache_rs ] || insmod "$PCACHE_KO"
}

# x_create <name> <target> <cache dev> [opt args...]
x_create() {
	local name=$1 target=$2 cache=$3
	shift 3
	create "$name" "0 $(sectors "$BACKING_DEV") $target $cache $BACKING_DEV $*"
}

# x_handover <first target> <second target> <data_crc>
x_handover() {
	local first=$1 second=$2 crc=$3 pm dev=/dev/mapper/${DM_PREFIX}x
	x_modules
	wipe_cache
	pm=$(c_slice x_pm "$C_CACHE_MIB")
	# The first module formats the cache and writes.
	x_create x "$first" "$pm" 2 data_crc "$crc"
	c_fio write "$dev" randwrite 0 64M 91
	c_fio write "$dev" write 1G 32M 92
	echo "$first before remove: $(dmsetup status "${DM_PREFIX}x")"
	[ "$(c_status x dirty_tail)" != "$(c_status x key_head)" ] ||
		echo "note: $first had written everything back before the remove"
	dms remove "${DM_PREFIX}x"
	# The second reads it all back, then writes some of its own and overwrites part.
	x_create x "$second" "$pm" 2 data_crc "$crc"
	echo "$second after attach: $(dmsetup status "${DM_PREFIX}x")"
	c_fio verify "$dev" randwrite 0 64M 91
	c_fio verify "$dev" write 1G 32M 92
	c_fio write "$dev" write 1G 16M 93
	c_fio write "$dev" randwrite 256M 32M 94
	dms remove "${DM_PREFIX}x"
	# And the first one reads what the second left.
	x_create x "$first" "$pm" 2 data_crc "$crc"
	c_fio verify "$dev" write 1G 16M 93
	c_fio verify "$dev" randwrite 256M 32M 94
	c_fio verify "$dev" randwrite 0 64M 91
	dms remove "${DM_PREFIX}x"
}

test_cache_compat_c_to_rs() {
	x_handover pcache pcache_rs false
}

test_cache_compat_rs_to_c() {
	x_handover pcache_rs pcache false
}

test_cache_compat_c_to_rs_data_crc() {
	x_handover pcache pcache_rs true
}

test_cache_compat_rs_to_c_data_crc() {
	x_handover pcache_rs pcache true
}

# A cache pcache_rs wrote in writeonly mode, with a write-zeroes and a discard among the writes,
# attaches to the C module (the README's claim: the log holds only ordinary keys, and the C module
# ignores the mode bits): the zeroed range reads as zeros there, and the data around it as it was.
test_cache_compat_rs_writeonly_zeroes_discard_to_c() {
	local pm dev=/dev/mapper/${DM_PREFIX}xz before
	x_modules
	wipe_cache
	pm=$(c_slice xz_pm "$C_CACHE_MIB")
	x_create xz pcache_rs "$pm" 2 cache_mode writeonly
	c_fio write "$dev" randwrite 0 32M 96
	blkdiscard -f -z -o 8M -l 8M "$dev" || fail "blkdiscard -z failed"
	blkdiscard -f -o 24M -l 8M "$dev" || fail "blkdiscard failed"
	before="$(region_sum "$dev" 0 8M) $(region_sum "$dev" 16M 8M)"
	dms remove "${DM_PREFIX}xz"
	x_create xz pcache "$pm"
	cmp <(head -c 8M /dev/zero) <(dd if="$dev" bs=1M skip=8 count=8 iflag=direct status=none) ||
		fail "the zeroed range does not read as zeros through the C module"
	expect_eq "the data around it, through the C module" "$before" \
		"$(region_sum "$dev" 0 8M) $(region_sum "$dev" 16M 8M)"
	dms remove "${DM_PREFIX}xz"
}
