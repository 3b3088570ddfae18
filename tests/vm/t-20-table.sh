# Constructor, table and status: the upstream dm-pcache table syntax
#   <start> <len> <target> <cache_dev> <backing_dev> [<#opt_args> [cache_mode writeback] [data_crc true|false]]
# accepted in every valid spelling, every malformed line rejected with its own message, `dmsetup
# table` output loadable back unchanged, and the upstream status format.
# shellcheck shell=bash

test_create_remove() {
	ensure_module
	wipe_cache
	create dev "$(table)"
	dmsetup info "${DM_PREFIX}dev" | grep -q 'State: *ACTIVE' || fail "device not active"
	expect_eq "device size (sectors)" "$(sectors "$BACKING_DEV")" "$(sectors "/dev/mapper/${DM_PREFIX}dev")"
	dms remove "${DM_PREFIX}dev"
	[ ! -e "/dev/mapper/${DM_PREFIX}dev" ] || fail "device node left after remove"
	# A second create on the same devices works: dtr released everything.
	create dev "$(table)"
	dms remove "${DM_PREFIX}dev"
}

test_create_option_spellings() {
	ensure_module
	local opts
	for opts in "0" "2 cache_mode writeback" "2 data_crc true" "2 data_crc false" \
		"4 cache_mode writeback data_crc true" "4 data_crc false cache_mode writeback"; do
		wipe_cache
		create dev "$(table "$opts")" || fail "valid options '$opts' rejected"
		dms remove "${DM_PREFIX}dev"
	done
}

# malformed <expected pcache_rs error> <expected C pcache error or "-" if upstream accepts it> <args>
# The table line "0 <len> <target> <args>" must be rejected, the kernel log must name the error, and
# no device may be left behind.
malformed() {
	local want_rs=$1 want_c=$2 args=$3 want log
	ensure_module
	if [ "$TARGET" = pcache_rs ]; then want=$want_rs; else want=$want_c; fi
	[ "$want" != - ] || skip "upstream dm-pcache accepts this line"
	kmsg_mark malformed
	must_fail dms create "${DM_PREFIX}bad" --table "0 $(sectors "$BACKING_DEV") $TARGET $args"
	log=$(kernel_log_since malformed)
	echo "$log"
	grep -qF "$TARGET: $want" <<<"$log" ||
		fail "kernel log lacks '$TARGET: $want'; got: $(grep 'device-mapper: table' <<<"$log" | tail -n1)"
	grep -q "device-mapper: table: .*: $TARGET: $want" <<<"$log" ||
		fail "error not reported through device-mapper: table"
	if dmsetup info "${DM_PREFIX}bad" >/dev/null 2>&1; then
		fail "device ${DM_PREFIX}bad left behind"
	fi
}

test_malformed_no_arguments() {
	malformed "Invalid argument count" "Insufficient args" ""
}
test_malformed_one_argument() {
	malformed "Invalid argument count" "Insufficient args" "$PMEM_DEV"
}
test_malformed_option_count_not_a_number() {
	malformed "Invalid optional argument count" "Invalid number of cache option arguments" \
		"$PMEM_DEV $BACKING_DEV x"
}
test_malformed_option_count_too_large() {
	malformed "Invalid optional argument count" "Invalid number of cache option arguments" \
		"$PMEM_DEV $BACKING_DEV 6 cache_mode writeback data_crc true"
}
test_malformed_option_count_beyond_arguments() {
	malformed "Invalid optional argument count" "Invalid number of cache option arguments" \
		"$PMEM_DEV $BACKING_DEV 4 cache_mode writeback"
}
test_malformed_option_count_negative() {
	malformed "Invalid optional argument count" "Invalid number of cache option arguments" \
		"$PMEM_DEV $BACKING_DEV -2 cache_mode writeback"
}
# An odd count always leaves an option without its value: rejected as a bad count, before any
# option is looked at (upstream finds the missing value instead).
test_malformed_cache_mode_missing_value() {
	malformed "Invalid optional argument count" "Missing value for cache_mode" \
		"$PMEM_DEV $BACKING_DEV 1 cache_mode"
}
test_malformed_data_crc_missing_value() {
	malformed "Invalid optional argument count" "Missing value for data_crc" \
		"$PMEM_DEV $BACKING_DEV 3 cache_mode writeback data_crc"
}
test_malformed_cache_mode_bad_value() {
	malformed "Invalid cache_mode" "Invalid cache mode parameter" \
		"$PMEM_DEV $BACKING_DEV 2 cache_mode writeahead"
}
test_malformed_data_crc_bad_value() {
	malformed "Invalid data_crc value" "Invalid data crc parameter" \
		"$PMEM_DEV $BACKING_DEV 2 data_crc yes"
}
test_malformed_unknown_option() {
	malformed "Unknown option" "Unrecognised cache option requested" \
		"$PMEM_DEV $BACKING_DEV 2 writeback_delay 10"
}
test_malformed_option_given_twice() {
	malformed "Option given twice" - \
		"$PMEM_DEV $BACKING_DEV 4 cache_mode writeback cache_mode writeback"
}
test_malformed_too_many_arguments() {
	malformed "Invalid argument count" - \
		"$PMEM_DEV $BACKING_DEV 2 cache_mode writeback $(printf 'x%.0s ' $(seq 40))"
}
test_malformed_trailing_argument() {
	malformed "Invalid argument count" - \
		"$PMEM_DEV $BACKING_DEV 2 cache_mode writeback extra"
}
test_malformed_cache_dev_missing() {
	malformed "Cache device lookup failed" "Error opening cache device" \
		"/dev/pcache-no-such-device $BACKING_DEV"
}
test_malformed_backing_dev_missing() {
	malformed "Backing device lookup failed" "Error opening backing device" \
		"$PMEM_DEV /dev/pcache-no-such-device"
}
test_malformed_length_beyond_backing() {
	# Upstream leaves this to device-mapper core, which reports it in its own words.
	[ "$TARGET" = pcache_rs ] || skip "upstream has no such check in its constructor"
	local log
	ensure_module
	kmsg_mark malformed
	must_fail dms create "${DM_PREFIX}bad" --table \
		"0 $(($(sectors "$BACKING_DEV") + 8)) $TARGET $PMEM_DEV $BACKING_DEV"
	log=$(kernel_log_since malformed)
	grep -q "device-mapper: table: .*: $TARGET: Target length exceeds backing device" <<<"$log" ||
		fail "no 'Target length exceeds backing device' in: $(grep 'device-mapper' <<<"$log" | tail -n1)"
}
test_malformed_same_device_twice() {
	malformed "Cache and backing device are the same" - "$PMEM_DEV $PMEM_DEV"
}
test_malformed_same_device_by_number() {
	# The same device, once by path and once as major:minor.
	local mm
	mm=$(lsblk -dno MAJ:MIN "$PMEM_DEV" | tr -d ' ')
	malformed "Cache and backing device are the same" - "$PMEM_DEV $mm"
}
test_malformed_cache_dev_not_dax() {
	local loop
	loop=$(make_loop 1024)
	malformed "Cache device does not support DAX" "Failed to start cache dev" "$loop $BACKING_DEV"
}
test_malformed_cache_dev_too_small() {
	# 256 MiB of the pmem through dm-linear: DAX-capable, but below the 512 MiB minimum.
	dms create "${DM_PREFIX}small" --table "0 524288 linear $PMEM_DEV 0"
	# (Without udev, /dev/mapper/* are device nodes, not links to dm-N: go by major:minor.)
	local mm
	mm=$(dmsetup info -c --noheadings -o major,minor --separator : "${DM_PREFIX}small" | tr -d ' ')
	[ "$(cat "/sys/dev/block/$mm/queue/dax")" = 1 ] ||
		skip "dm-linear over pmem is not DAX-capable on this kernel"
	malformed "Cache device too small" "Failed to start cache dev" \
		"/dev/mapper/${DM_PREFIX}small $BACKING_DEV"
}

# `dmsetup table` prints a line that creates the same device again, unchanged.
roundtrip() { # <opt args>
	local t1 t2
	wipe_cache
	create rt "$(table "$@")"
	t1=$(dmsetup table "${DM_PREFIX}rt")
	echo "table: $t1"
	if [ "$TARGET" = pcache ] && [[ $t1 == *" crc "* ]]; then
		skip "upstream prints 'crc' where its constructor expects 'data_crc' (known upstream bug)"
	fi
	dms remove "${DM_PREFIX}rt"
	# Load the printed line into a new, inactive device, then activate it.
	dms create "${DM_PREFIX}rt" --notable
	dms load "${DM_PREFIX}rt" --table "$t1" || fail "printed table '$t1' not accepted by load"
	dms resume "${DM_PREFIX}rt"
	t2=$(dmsetup table "${DM_PREFIX}rt")
	expect_eq "table after reload" "$t1" "$t2"
	dms remove "${DM_PREFIX}rt"
}
test_table_roundtrip_defaults() {
	ensure_module
	roundtrip
}
test_table_roundtrip_data_crc() {
	ensure_module
	roundtrip 4 cache_mode writeback data_crc true
}
test_table_shows_options() {
	ensure_module
	local t
	wipe_cache
	create dev "$(table 2 data_crc true)"
	t=$(dmsetup table "${DM_PREFIX}dev")
	[[ $t == *"data_crc true"* ]] || [[ $TARGET == pcache && $t == *"crc true"* ]] ||
		fail "table '$t' does not show data_crc true"
	[[ $t == *"cache_mode writeback"* ]] || fail "table '$t' does not show cache_mode writeback"
}

# Upstream STATUSTYPE_INFO:
#   <sb_flags> <seg_total> <cache_segs> <segs_used> <gc_percent> <cache_flags>
#   <key_head_seg>:<key_head_off> <dirty_tail_seg>:<dirty_tail_off> <key_tail_seg>:<key_tail_off>
# sb_flags and cache_flags in hex; cache_flags bit 0 is DATA_CRC.
status_fields() { # <device> -> the status fields after "<start> <len> <target>"
	dmsetup status "$1" | cut -d' ' -f4-
}
test_status_format() {
	ensure_module
	local s f seg_max
	wipe_cache
	create dev "$(table)"
	s=$(dmsetup status "${DM_PREFIX}dev")
	echo "status: $s"
	# Upstream's fields; pcache_rs appends its statistics (a count, then the values).
	local ours=
	[ "$TARGET" != pcache_rs ] || ours=" ${#C_STATS[@]}( [0-9]+){${#C_STATS[@]}}"
	expect_match "status line" \
		"^0 $(sectors "$BACKING_DEV") $TARGET [0-9a-f]+ [0-9]+ [0-9]+ [0-9]+ [0-9]+ [0-9a-f]+ [0-9]+:[0-9]+ [0-9]+:[0-9]+ [0-9]+:[0-9]+$ours\$" "$s"
	read -ra f <<<"$(status_fields "${DM_PREFIX}dev")"
	seg_max=$(($(sectors "$PMEM_DEV") * 512 / (16 << 20)))
	((f[1] > 0 && f[1] <= seg_max)) || fail "seg_total ${f[1]} not in 1..$seg_max (16 MiB segments of the cache)"
	((f[2] > 0 && f[2] <= f[1])) || fail "cache_segs ${f[2]} not in 1..seg_total ${f[1]}"
	((f[3] <= f[2])) || fail "segs_used ${f[3]} > cache_segs ${f[2]}"
	((f[4] <= 90)) || fail "gc_percent ${f[4]} > 90"
	expect_eq "cache_flags DATA_CRC bit without data_crc" 0 $((0x${f[5]} & 1))
	dms remove "${DM_PREFIX}dev"

	wipe_cache
	create dev "$(table 2 data_crc true)"
	read -ra f <<<"$(status_fields "${DM_PREFIX}dev")"
	expect_eq "cache_flags DATA_CRC bit with data_crc true" 1 $((0x${f[5]} & 1))
}

test_message_gc_percent() {
	ensure_module
	local f
	wipe_cache
	create dev "$(table)"
	dms message "${DM_PREFIX}dev" 0 gc_percent 80
	read -ra f <<<"$(status_fields "${DM_PREFIX}dev")"
	expect_eq "gc_percent after message" 80 "${f[4]}"
	dms message "${DM_PREFIX}dev" 0 gc_percent 0
	read -ra f <<<"$(status_fields "${DM_PREFIX}dev")"
	expect_eq "gc_percent after message" 0 "${f[4]}"
	must_fail dms message "${DM_PREFIX}dev" 0 gc_percent 91
	must_fail dms message "${DM_PREFIX}dev" 0 gc_percent -1
	must_fail dms message "${DM_PREFIX}dev" 0 gc_percent abc
	must_fail dms message "${DM_PREFIX}dev" 0 gc_percent
	must_fail dms message "${DM_PREFIX}dev" 0 gc_percent 10 20
	read -ra f <<<"$(status_fields "${DM_PREFIX}dev")"
	expect_eq "gc_percent after rejected messages" 0 "${f[4]}"
}

# The statistics after upstream's fields count what happened: writes to new and to cached ranges,
# reads the cache holds and ones it does not; every dirty byte logged that nothing overwrote is
# either dirty or written back; `stats reset` zeroes the counters (but not the dirty bytes, which
# are state) and other stats messages are refused.
test_status_statistics() {
	[ "$TARGET" = pcache_rs ] || skip "upstream's status has no statistics"
	ensure_module
	local dev=/dev/mapper/${DM_PREFIX}st s
	wipe_cache
	create st "$(table)"
	for s in "${C_STATS[@]}"; do expect_eq "$s at creation" 0 "$(c_stat st "$s")"; done
	dd if=/dev/urandom of="$dev" bs=64k count=16 oflag=direct status=none
	expect_eq "write misses after 16 writes to an empty cache" 16 "$(c_stat st write_misses)"
	expect_eq "write hits after 16 writes to an empty cache" 0 "$(c_stat st write_hits)"
	# Each byte logged and not overwritten since is dirty or written back, whenever we look.
	# (Writeback skips a dirty key a later write replaced, so the count holds for writes that
	# nothing overwrote before writeback passed them: the rewrite below comes after the drain.)
	st_drained() {
		local dirty back
		read -r dirty back <<<"$(c_stat st dirty_bytes bytes_written_back)"
		expect_eq "dirty + written back bytes (one status line)" $(($1 << 16)) $((dirty + back))
		c_wait_drained st 120
		for ((s = 0; s < 20; s++)); do [ "$(c_stat st dirty_bytes)" = 0 ] && break; sleep 1; done
		expect_eq "dirty bytes once written back" 0 "$(c_stat st dirty_bytes)"
		expect_eq "bytes written back" $(($1 << 16)) "$(c_stat st bytes_written_back)"
	}
	st_drained 16
	dd if=/dev/urandom of="$dev" bs=64k count=4 oflag=direct status=none
	expect_eq "write hits after rewriting 4 cached blocks" 4 "$(c_stat st write_hits)"
	dd if="$dev" of=/dev/null bs=64k count=8 iflag=direct status=none
	expect_eq "read hits of cached blocks" 8 "$(c_stat st read_hits)"
	dd if="$dev" of=/dev/null bs=64k count=2 skip=1000 iflag=direct status=none
	expect_eq "read misses of uncached blocks" 2 "$(c_stat st read_misses)"
	st_drained 20
	dms message "${DM_PREFIX}st" 0 stats reset
	for s in "${C_STATS[@]}"; do expect_eq "$s after stats reset" 0 "$(c_stat st "$s")"; done
	must_fail dms message "${DM_PREFIX}st" 0 stats clear
	must_fail dms message "${DM_PREFIX}st" 0 stats
}

test_message_unknown_rejected() {
	ensure_module
	wipe_cache
	create dev "$(table)"
	must_fail dms message "${DM_PREFIX}dev" 0 no_such_message
	must_fail dms message "${DM_PREFIX}dev" 0 flush now
	must_fail dms message "${DM_PREFIX}dev" 0 ""
}

# The example tables in dmsetup-tables/ load (with this VM's devices put in).
test_example_tables() {
	ensure_module
	local f n=0
	for f in "$REPO_ROOT_DIR"/dmsetup-tables/"$TARGET"-*.table; do
		[ -f "$f" ] || continue
		sed "s#/dev/pmem0#$PMEM_DEV#; s#/dev/vdb#$BACKING_DEV#; s/ 8388608 / $(sectors "$BACKING_DEV") /" "$f" >"$T_TMP/table"
		wipe_cache
		dms create "${DM_PREFIX}ex" "$T_TMP/table" || fail "$(basename "$f") does not load"
		dms remove "${DM_PREFIX}ex"
		n=$((n + 1))
	done
	[ "$n" -gt 0 ] || fail "no dmsetup-tables/$TARGET-*.table files"
}
