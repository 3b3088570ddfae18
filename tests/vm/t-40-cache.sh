# The cache itself: data written through the cache comes back byte for byte under every setting
# (data_crc on/off, gc_percent 0/70/90) with a working set larger than the cache, across remove and
# create, suspend and resume and a table reload; writeback drains to the backing device; and every
# kind of bad input is refused with its own error and no kernel splat.
# shellcheck shell=bash
#
# The cache helpers (c_new, c_fio, c_status, ...) are in lib.sh.

# c_fio_matrix <data_crc true|false>: the fio verify matrix over one device. For each gc_percent
# (0, 70, 90) a sequential and a random job (bs 4k..1M, numjobs 2), each on its own region; at the
# end every region is verified again. gc_percent 0 makes GC reclaim every written-back segment, so
# the key tail must have moved by the end.
C_MATRIX_MIB=${C_MATRIX_MIB:-16}
c_fio_matrix() {
	local crc=$1 dev name=fio_$1 gc i=0 tail0 regions=() m=$C_MATRIX_MIB
	dev=$(c_new "$name" 2 data_crc "$crc")
	dmsetup status "${DM_PREFIX}$name"
	tail0=$(c_status "$name" key_tail)
	for gc in 0 70 90; do
		dms message "${DM_PREFIX}$name" 0 gc_percent "$gc"
		expect_eq "gc_percent in status" "$gc" "$(c_status "$name" gc_percent)"
		for rw in write randwrite; do
			c_fio write "$dev" "$rw" "$((i * m))M" "${m}M" "$((1000 + i))"
			regions+=("$rw $((i * m))M ${m}M $((1000 + i))")
			i=$((i + 1))
			echo "after $rw at gc_percent $gc: $(dmsetup status "${DM_PREFIX}$name")"
		done
		[ "$gc" != 0 ] || c_wait_moved "$name" key_tail "$tail0" 300
	done
	c_fio_verify_all "$dev" "${regions[@]}"
	expect_eq "table data_crc" "$crc" "$(dmsetup table "${DM_PREFIX}$name" | sed -n 's/.*data_crc \([a-z]*\).*/\1/p')"
}

# Scattered 512-byte writes, many more than the cache has keys for (one key per 2 KiB of cache:
# about 250K for the 512 MiB cache): they complete without an IO error, because keys running short
# starts writeback and GC just as segments running short does. gc_percent 90 keeps GC from running
# for segment usage alone (512-byte keys fill few segments), so the key tail moving shows GC ran for
# keys. Every block is verified after the last write. Long (tests/run --long): the cache can only
# take these writes as fast as writeback gets 512-byte blocks to the backing device, which under
# TCG is many minutes; the same property is checked on the host (tests/host/interleave.rs, with a
# key index smaller than the data space).
C_SMALL_IOS=${C_SMALL_IOS:-320000}
test_long_cache_small_writes_past_the_key_pool() {
	local dev tail0 n_segs used
	dev=$(c_new small)
	dms message "${DM_PREFIX}small" 0 gc_percent 90
	tail0=$(c_status small key_tail)
	n_segs=$(c_status small n_segs)
	c_fio_run "512-byte randwrite, $C_SMALL_IOS writes, on $dev" --name=small --filename="$dev" \
		--direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=512 --size=1G \
		--number_ios="$C_SMALL_IOS" --randseed=91 \
		--verify=crc32c --verify_fatal=1 --verify_backlog=0 --verify_state_save=0
	used=$(c_status small used_segs)
	echo "after $C_SMALL_IOS writes of 512 bytes: $(dmsetup status "${DM_PREFIX}small")"
	[ "$(c_status small key_tail)" != "$tail0" ] ||
		fail "key tail never moved ($tail0): GC did not run although keys ran short"
	[ "$((used * 100))" -lt "$((n_segs * 90))" ] ||
		fail "$used of $n_segs segments used: GC may have run for segments, not keys"
}

test_cache_fio_verify_data_crc_off() {
	c_fio_matrix false
}

test_cache_fio_verify_data_crc_on() {
	c_fio_matrix true
}

# data_crc can be switched at run time; data written under either setting reads back.
test_cache_data_crc_message() {
	local dev
	dev=$(c_new crcmsg)
	c_fio write "$dev" write 0 16M 11
	dms message "${DM_PREFIX}crcmsg" 0 data_crc true ||
		fail "data_crc true rejected on a live cache: $(dmesg | grep pcache_rs | tail -n 1)"
	expect_match "table after data_crc true" "data_crc true" "$(dmsetup table "${DM_PREFIX}crcmsg")"
	c_fio write "$dev" write 16M 16M 12
	dms message "${DM_PREFIX}crcmsg" 0 data_crc false
	expect_match "table after data_crc false" "data_crc false" "$(dmsetup table "${DM_PREFIX}crcmsg")"
	c_fio write "$dev" write 32M 16M 13
	c_fio verify "$dev" write 0 16M 11
	c_fio verify "$dev" write 16M 16M 12
	c_fio verify "$dev" write 32M 16M 13
	# Across a re-attach too: each key remembers whether it carries a CRC.
	dms remove "${DM_PREFIX}crcmsg"
	create crcmsg "$(c_table "/dev/mapper/${DM_PREFIX}crcmsg_pm")"
	c_fio verify "$dev" write 0 16M 11
	c_fio verify "$dev" write 16M 16M 12
	c_fio verify "$dev" write 32M 16M 13
}

# A process may rewrite its O_DIRECT buffer while the write is in flight (the device then gets any
# mix of old and new bytes). That must not leave a key whose data CRC does not match its data: such
# a key would fail every read and every writeback, and its dirty data would never reach the backing
# device. One thread rewrites a 64 KiB buffer as fast as it can while another writes it over 16 MiB
# (data_crc on), 4 times over; then the region reads back through the cache without an IO error or a
# CRC error counted, writeback drains, and the backing device holds what the cache returned. On this
# VM's CPU (x86-64 with SSE4.2) pcache_rs stores and CRCs each word in one pass; its load-time check
# of that pass against crc32c() passed (else it says so and stages each sector instead).
test_cache_data_crc_buffer_rewritten_during_write() {
	local dev
	if [ "$TARGET" = pcache_rs ] && dmesg | grep -q "single-pass data CRC disagrees"; then
		fail "the single-pass store and CRC disagreed with crc32c at module load"
	fi
	dev=$(c_new unstable 2 data_crc true)
	"$HERE/rewritten-buffer" write "$dev" || fail "the writer failed"
	dd if="$dev" of="$T_TMP/rewritten-cache" bs=1M count=16 iflag=direct status=none ||
		fail "reading the rewritten region failed: $(dmesg | grep pcache | tail -n 2)"
	[ "$TARGET" != pcache_rs ] || expect_eq "CRC errors" 0 "$(c_stat unstable crc_errors)"
	c_wait_drained unstable 120
	[ "$TARGET" != pcache_rs ] || expect_eq "writeback errors" 0 "$(c_stat unstable writeback_errors)"
	dms remove "${DM_PREFIX}unstable"
	dd if="$BACKING_DEV" of="$T_TMP/rewritten-backing" bs=1M count=16 iflag=direct status=none ||
		fail "cannot read the backing device"
	cmp "$T_TMP/rewritten-cache" "$T_TMP/rewritten-backing" ||
		fail "the backing device holds other data than the cache returned"
}

# The read side of the test above: a read of an extent whose CRC is not yet checked checks it, and
# that check is of the bytes the cache holds, not of the reader's buffer after the copy, which its
# owner may be rewriting. Each round writes 16 MiB in 64 KiB writes (new keys, unchecked) and reads
# each back with O_DIRECT into a buffer another thread rewrites meanwhile (data_crc on): no read
# fails, no CRC error is counted, and a read with the buffer left alone returns what was written.
test_cache_data_crc_buffer_rewritten_during_read() {
	local dev
	dev=$(c_new unstable 2 data_crc true)
	"$HERE/rewritten-buffer" write-read "$dev" ||
		fail "a read failed: $(dmesg | grep pcache | tail -n 2)"
	[ "$TARGET" != pcache_rs ] || expect_eq "CRC errors" 0 "$(c_stat unstable crc_errors)"
}

# GC keeps the live data of the ksets it collects (it copies it forward): a 16 MiB working set
# written once, then 384 MiB written over and over to another 16 MiB at gc_percent 20 (GC passes
# the working set's ksets several times), still reads back as 16 hits with the data written, and
# the status counts at least its 16 MiB as kept. Upstream drops it: every read would miss.
test_cache_gc_keeps_live_data() {
	[ "$TARGET" = pcache_rs ] || skip "upstream drops the live data of the ksets GC collects"
	local dev kept misses
	dev=$(c_new keep)
	dms message "${DM_PREFIX}keep" 0 gc_percent 20
	head -c 16M /dev/urandom >"$T_TMP/keep-ws"
	dd if="$T_TMP/keep-ws" of="$dev" bs=1M seek=256 oflag=direct status=none ||
		fail "writing the working set failed"
	local i
	for i in $(seq 24); do
		dd if=/dev/urandom of="$dev" bs=1M count=16 oflag=direct status=none ||
			fail "write $i over the other range failed"
	done
	kept=$(c_stat keep gc_kept_bytes)
	((kept >= 16 << 20)) || fail "GC kept $kept bytes, less than the working set: $(dmsetup status "${DM_PREFIX}keep")"
	misses=$(c_stat keep read_misses)
	dd if="$dev" of="$T_TMP/keep-read" bs=1M skip=256 count=16 iflag=direct status=none ||
		fail "reading the working set failed"
	[ "$(c_stat keep read_misses)" = "$misses" ] ||
		fail "reads of the working set missed: $(dmsetup status "${DM_PREFIX}keep")"
	cmp "$T_TMP/keep-ws" "$T_TMP/keep-read" || fail "the working set read back other data"
}

# A read miss fills the cache with what the backing device returned, not with what the reader's
# buffer holds by the time the fill copies it: the reader may rewrite an O_DIRECT buffer as soon
# as its data arrives. 16 MiB of random data on the backing device are read through a fresh cache
# in 64 KiB O_DIRECT reads (each a miss that fills) into a buffer another thread rewrites
# meanwhile; then the same range, now cached, must read back as the backing device holds it.
test_cache_miss_fill_buffer_rewritten() {
	[ "$TARGET" = pcache_rs ] || skip "upstream fills misses from the reader's pages"
	local dev
	head -c 16M /dev/urandom >"$T_TMP/miss-backing"
	dd if="$T_TMP/miss-backing" of="$BACKING_DEV" bs=1M oflag=direct status=none ||
		fail "cannot write the backing device"
	dev=$(c_new missfill)
	"$HERE/rewritten-buffer" read "$dev" || fail "the reader failed"
	expect_eq "read misses of the first pass" 256 "$(c_stat missfill read_misses)"
	dd if="$dev" of="$T_TMP/miss-cache" bs=1M count=16 iflag=direct status=none ||
		fail "reading the filled range failed"
	expect_eq "read hits of the second pass" 16 "$(c_stat missfill read_hits)"
	cmp "$T_TMP/miss-backing" "$T_TMP/miss-cache" ||
		fail "the cache holds other data than the backing device for a range it filled on a miss"
}

# A miss whose pages of its own cannot be had without waiting (fail_page_alloc fails the reader's
# non-waiting page allocations) still reads what the backing device holds, straight into the
# reader's buffer, and caches nothing of it: the next pass misses again, with no error counted;
# once allocations succeed again, the pass after that caches as usual.
test_cache_miss_without_pages_of_its_own() {
	[ "$TARGET" = pcache_rs ] || skip "upstream has no pages of its own for misses"
	local dev fi=/sys/kernel/debug/fail_page_alloc
	[ -d "$fi" ] || fail "the test kernel has no $fi (CONFIG_FAIL_PAGE_ALLOC, debugfs)"
	head -c 16M /dev/urandom >"$T_TMP/nopages-backing"
	dd if="$T_TMP/nopages-backing" of="$BACKING_DEV" bs=1M oflag=direct status=none ||
		fail "cannot write the backing device"
	dev=$(c_new nopages)
	echo Y >"$fi/task-filter"
	echo Y >"$fi/ignore-gfp-wait"
	echo 0 >"$fi/min-order"
	echo 0 >"$fi/verbose"
	echo 0 >"$fi/space"
	echo 1 >"$fi/interval"
	echo -1 >"$fi/times"
	echo 100 >"$fi/probability"
	# Only this subshell and what it runs sees allocations fail (task-filter, make-it-fail).
	(echo 1 >/proc/self/make-it-fail &&
		exec dd if="$dev" of="$T_TMP/nopages-1" bs=64K count=256 iflag=direct status=none)
	local rc=$?
	echo 0 >"$fi/probability"
	[ "$rc" = 0 ] || fail "a read failed while page allocations failed: $(dmesg | grep pcache | tail -n 2)"
	cmp "$T_TMP/nopages-backing" "$T_TMP/nopages-1" ||
		fail "a read without pages of its own returned other data than the backing device holds"
	expect_eq "read misses while allocations failed" 256 "$(c_stat nopages read_misses)"
	dd if="$dev" of="$T_TMP/nopages-2" bs=1M count=16 iflag=direct status=none ||
		fail "the second read failed"
	expect_eq "read hits of the pass after (nothing was cached)" 0 "$(c_stat nopages read_hits)"
	expect_eq "read misses of the pass after" 272 "$(c_stat nopages read_misses)"
	expect_eq "backing errors" 0 "$(c_stat nopages backing_errors)"
	dd if="$dev" of="$T_TMP/nopages-3" bs=1M count=16 iflag=direct status=none ||
		fail "the third read failed"
	expect_eq "read hits of the third pass" 16 "$(c_stat nopages read_hits)"
	cmp "$T_TMP/nopages-backing" "$T_TMP/nopages-3" || fail "the cache returned other data"
}

# REQ_NOWAIT, which io_uring's first attempt at each request carries (here RWF_NOWAIT): the target
# takes it whatever the backing device does (dm-delay and brd here do not all), serves a read the
# cache holds whole and a write it takes, and ends a read that misses with EAGAIN having counted
# and cached nothing; the same read without the flag then reads what the backing device holds. In
# writethrough mode a write with the flag ends with EAGAIN and writes nothing. Last, io_uring
# (which retries an EAGAIN from its own workers, without the flag) writes a region through a
# writeback cache and verifies it through a fresh one, where every read first misses.
test_cache_nowait() {
	[ "$TARGET" = pcache_rs ] || skip "upstream does not take REQ_NOWAIT"
	local dev rc m=$((1 << 20)) io="$HERE/nowait-io"
	head -c 1M /dev/urandom >"$T_TMP/nw-backing"
	head -c 64K /dev/urandom >"$T_TMP/nw-write"
	dd if="$T_TMP/nw-backing" of="$BACKING_DEV" bs=1M oflag=direct status=none ||
		fail "cannot write the backing device"
	dev=$(c_new nowait)
	rc=0
	"$io" read "$dev" 0 "$T_TMP/nw-1" || rc=$?
	expect_eq "a NOWAIT read that misses: its exit status (11: EAGAIN)" 11 "$rc"
	expect_eq "read misses counted for it" 0 "$(c_stat nowait read_misses)"
	dd if="$dev" of="$T_TMP/nw-2" bs=64K count=1 iflag=direct status=none || fail "the read without the flag failed"
	cmp "$T_TMP/nw-2" <(head -c 64K "$T_TMP/nw-backing") || fail "the read without the flag returned other data"
	expect_eq "read misses after it" 1 "$(c_stat nowait read_misses)"
	"$io" read "$dev" 0 "$T_TMP/nw-3" || fail "a NOWAIT read the cache holds failed"
	cmp "$T_TMP/nw-3" "$T_TMP/nw-2" || fail "a NOWAIT read the cache holds returned other data"
	expect_eq "read hits" 1 "$(c_stat nowait read_hits)"
	"$io" write "$dev" "$m" "$T_TMP/nw-write" || fail "a NOWAIT write failed"
	"$io" read "$dev" "$m" "$T_TMP/nw-4" || fail "a NOWAIT read of what a NOWAIT write wrote failed"
	cmp "$T_TMP/nw-4" "$T_TMP/nw-write" || fail "a NOWAIT write did not read back"
	expect_eq "read hits" 2 "$(c_stat nowait read_hits)"
	c_fio write "$dev" randwrite 8M 16M 31 --ioengine=io_uring --iodepth=16
	c_wait_drained nowait 120
	dms remove "${DM_PREFIX}nowait"

	dev=$(c_new nowait_wt 2 cache_mode writethrough)
	rc=0
	"$io" write "$dev" 0 "$T_TMP/nw-write" || rc=$?
	expect_eq "a NOWAIT write in writethrough mode: its exit status (11: EAGAIN)" 11 "$rc"
	cmp <(dd if="$BACKING_DEV" bs=64K count=1 iflag=direct status=none) <(head -c 64K "$T_TMP/nw-backing") ||
		fail "a NOWAIT write that ended with EAGAIN changed the backing device"
	expect_eq "write misses counted for it" 0 "$(c_stat nowait_wt write_misses)"
	dms remove "${DM_PREFIX}nowait_wt"

	dev=$(c_new nowait2)
	c_fio verify "$dev" randwrite 8M 16M 31 --ioengine=io_uring --iodepth=16
	[ "$(c_stat nowait2 read_misses)" -gt 0 ] || fail "the io_uring verify missed nothing: it tested no retry"
	expect_eq "backing errors" 0 "$(c_stat nowait2 backing_errors)"
}

# The same for writethrough: a write through caches what the backing device took. One thread
# rewrites a 64 KiB buffer while another writes it over 16 MiB with O_DIRECT, 4 times over; then
# what the cache returns for the range (its hits) must be what the backing device holds.
test_cache_writethrough_buffer_rewritten() {
	[ "$TARGET" = pcache_rs ] || skip "upstream fills writes through from the writer's pages"
	local dev
	dev=$(c_new wtfill 2 cache_mode writethrough)
	"$HERE/rewritten-buffer" write "$dev" || fail "the writer failed"
	local hits
	hits=$(c_stat wtfill read_hits)
	dd if="$dev" of="$T_TMP/wt-cache" bs=1M count=16 iflag=direct status=none ||
		fail "reading the written range failed"
	expect_eq "read hits over the written range" $((hits + 16)) "$(c_stat wtfill read_hits)"
	dms remove "${DM_PREFIX}wtfill"
	dd if="$BACKING_DEV" of="$T_TMP/wt-backing" bs=1M count=16 iflag=direct status=none ||
		fail "cannot read the backing device"
	cmp "$T_TMP/wt-cache" "$T_TMP/wt-backing" ||
		fail "the cache holds other data than the backing device for a range written through"
}

# Remove (no writeback wait) and create again with the same table: every dirty byte is there.
test_cache_remove_create_dirty() {
	local dev tbl
	dev=$(c_new rc)
	tbl=$(dmsetup table "${DM_PREFIX}rc")
	c_fio write "$dev" randwrite 64M 64M 21
	c_fio write "$dev" write 1G 32M 22
	dmsetup status "${DM_PREFIX}rc"
	if [ "$(c_status rc dirty_tail)" = "$(c_status rc key_head)" ]; then
		echo "note: writeback had already caught up before the remove"
	fi
	dms remove "${DM_PREFIX}rc"
	create rc "$tbl"
	c_fio verify "$dev" randwrite 64M 64M 21
	c_fio verify "$dev" write 1G 32M 22
	# And a second cycle after more writes over the replayed cache.
	c_fio write "$dev" randwrite 80M 32M 23
	dms remove "${DM_PREFIX}rc"
	create rc "$tbl"
	c_fio verify "$dev" write 1G 32M 22
	c_fio verify "$dev" randwrite 80M 32M 23
}

test_cache_suspend_resume() {
	local dev
	dev=$(c_new sr)
	c_fio write "$dev" randwrite 0 32M 31
	dms suspend "${DM_PREFIX}sr"
	dmsetup info "${DM_PREFIX}sr" | grep -q 'State: *SUSPENDED' || fail "device not suspended"
	dmsetup status "${DM_PREFIX}sr"
	dms resume "${DM_PREFIX}sr"
	c_fio verify "$dev" randwrite 0 32M 31
	# IO queued while suspended completes after resume.
	dms suspend "${DM_PREFIX}sr"
	c_fio write "$dev" write 32M 16M 32 &
	local pid=$!
	sleep 2
	dms resume "${DM_PREFIX}sr"
	wait "$pid" || fail "write issued while suspended failed"
	c_fio verify "$dev" randwrite 0 32M 31
	c_fio verify "$dev" write 32M 16M 32
}

# dmsetup suspend; load the table `dmsetup table` printed; resume: the new instance takes over the
# cache device at resume, and every byte survives.
test_cache_table_reload() {
	[ "$TARGET" = pcache_rs ] || skip "upstream refuses table loads for a live device"
	local dev tbl i
	dev=$(c_new rl 2 data_crc true)
	c_fio write "$dev" randwrite 0 48M 41
	for i in 1 2; do
		tbl=$(dmsetup table "${DM_PREFIX}rl")
		dms suspend "${DM_PREFIX}rl"
		dms load "${DM_PREFIX}rl" --table "$tbl"
		dms resume "${DM_PREFIX}rl"
		expect_eq "table after reload $i" "$tbl" "$(dmsetup table "${DM_PREFIX}rl")"
		c_fio verify "$dev" randwrite 0 48M 41
		c_fio write "$dev" write "$((48 + i * 16))M" 16M "$((41 + i))"
	done
	c_fio verify "$dev" write 64M 16M 42
	c_fio verify "$dev" write 80M 16M 43
	# A reload with a table that fails keeps the old instance working.
	dms suspend "${DM_PREFIX}rl"
	must_fail dms load "${DM_PREFIX}rl" --table "$(c_table "/dev/mapper/${DM_PREFIX}rl_pm" 1 bogus)"
	dms resume "${DM_PREFIX}rl"
	c_fio verify "$dev" randwrite 0 48M 41
}

# LVM's order: load the new table while the device is live and in use, then suspend and resume.
# The inactive table's constructor only validates (the live instance keeps the cache device);
# the new instance takes over in preresume, once device-mapper has destroyed the old one. fio
# writes across two swaps without an error and its data verifies; the second swap's data_crc
# takes effect; a load that is cleared instead of resumed leaves the live device as it was; and
# after the backing device grew, a longer table takes effect.
test_cache_reload_in_lvm_order() {
	[ "$TARGET" = pcache_rs ] || skip "upstream refuses table loads for a live device"
	local back=${DM_PREFIX}lo_back cache dev tbl pid sz
	ensure_module
	wipe_cache
	sz=$(($(sectors "$BACKING_DEV") / 2))
	dms create "$back" --table "0 $sz linear $BACKING_DEV 0"
	cache=$(c_slice lo_pm "$C_CACHE_MIB")
	tbl="0 $sz $TARGET $cache /dev/mapper/$back"
	create lo "$tbl"
	dev=/dev/mapper/${DM_PREFIX}lo
	c_fio write "$dev" randwrite 0 64M 91 &
	pid=$!
	sleep 3
	dms load "${DM_PREFIX}lo" --table "$tbl"
	dmsetup status "${DM_PREFIX}lo" | grep -q " $TARGET " || fail "the live device stopped answering status"
	dms suspend "${DM_PREFIX}lo"
	dms resume "${DM_PREFIX}lo"
	dms load "${DM_PREFIX}lo" --table "$tbl 2 data_crc true"
	dms suspend "${DM_PREFIX}lo"
	dms resume "${DM_PREFIX}lo"
	wait "$pid" || fail "fio writing across the table swaps failed"
	[[ $(dmsetup table "${DM_PREFIX}lo") == *"data_crc true"* ]] || fail "data_crc of the new table did not take effect"
	c_fio verify "$dev" randwrite 0 64M 91
	# Loaded, then cleared: the live instance never noticed.
	dms load "${DM_PREFIX}lo" --table "$tbl 2 data_crc false"
	dms clear "${DM_PREFIX}lo"
	[[ $(dmsetup table "${DM_PREFIX}lo") == *"data_crc true"* ]] || fail "a cleared load changed the live table"
	c_fio write "$dev" write 64M 16M 92
	# The backing device grows (in LVM's order too); a longer table follows it.
	dms load "$back" --table "0 $((sz * 2)) linear $BACKING_DEV 0"
	dms suspend "$back"
	dms resume "$back"
	dms load "${DM_PREFIX}lo" --table "0 $((sz * 2)) $TARGET $cache /dev/mapper/$back 2 data_crc true"
	dms suspend "${DM_PREFIX}lo"
	dms resume "${DM_PREFIX}lo"
	expect_eq "device size after the longer table" $((sz * 2)) "$(sectors "$dev")"
	c_fio write "$dev" write "$((sz / 2048 + 16))M" 16M 93
	c_fio verify "$dev" randwrite 0 64M 91
	c_fio verify "$dev" write 64M 16M 92
	c_fio verify "$dev" write "$((sz / 2048 + 16))M" 16M 93
	# A table of another device naming the same cache device is still refused.
	must_fail dms create "${DM_PREFIX}lo2" --table "$tbl"
}

# Writeback catches up (status: dirty tail reaches key head); then the backing device alone, without
# the cache, holds every byte.
test_cache_writeback_drains() {
	local dev
	dev=$(c_new wb)
	c_fio write "$dev" randwrite 0 48M 51
	c_fio write "$dev" write 512M 48M 52
	echo "before drain: $(dmsetup status "${DM_PREFIX}wb")"
	c_wait_drained wb 600
	echo "drained: $(dmsetup status "${DM_PREFIX}wb")"
	dms remove "${DM_PREFIX}wb"
	c_fio verify "$BACKING_DEV" randwrite 0 48M 51
	c_fio verify "$BACKING_DEV" write 512M 48M 52
}

# Writeback that meets a failing backing device counts the error and retries the same data later:
# nothing is dropped. The backing device is a dm-linear over the real one whose table is swapped for
# dm-error while dirty data waits, and back again.
test_cache_writeback_retries_backing_errors() {
	local back=${DM_PREFIX}wbe_back cache dev before log sz
	ensure_module
	wipe_cache
	sz=$(sectors "$BACKING_DEV")
	dms create "$back" --table "0 $sz linear $BACKING_DEV 0"
	cache=$(c_slice wbe_pm "$C_CACHE_MIB")
	create wbe "0 $sz $TARGET $cache /dev/mapper/$back"
	dev=/dev/mapper/${DM_PREFIX}wbe
	# Nothing may reach the backing device before it fails: fail it first, then write.
	dm_swap "$back" "0 $sz error"
	before=$(kernel_log_lines)
	c_fio write "$dev" randwrite 0 32M 61
	c_fio write "$dev" write 256M 16M 62
	sleep 5
	log=$(kernel_log_since "$before")
	# Upstream words its writeback errors differently.
	[ "$TARGET" != pcache_rs ] || grep -q "pcache_rs: writeback: " <<<"$log" ||
		fail "no writeback error reported while the backing device failed"
	[ "$(c_status wbe dirty_tail)" != "$(c_status wbe key_head)" ] ||
		fail "the dirty tail reached the key head although nothing could be written back"
	[ "$TARGET" != pcache_rs ] || [ "$(c_stat wbe writeback_errors)" -gt 0 ] ||
		fail "no writeback error counted in the status: $(dmsetup status "$DM_PREFIX"wbe)"
	# The cache still serves everything it holds.
	c_fio verify "$dev" randwrite 0 32M 61
	dm_swap "$back" "0 $sz linear $BACKING_DEV 0"
	c_wait_drained wbe 600
	dms remove "${DM_PREFIX}wbe"
	dms remove "$back"
	c_fio verify "$BACKING_DEV" randwrite 0 32M 61
	c_fio verify "$BACKING_DEV" write 256M 16M 62
}

# cache_mode writeonly: reads the cache does not hold are not cached (a second read of the same
# range misses again), while written data is read from the cache; data verifies as in writeback
# mode, across remove and create; the mode is in the mode bits of cache_flags (3); a table naming
# another mode is refused while the cache holds dirty data (the backing device fails writes, so it
# stays dirty), and accepted once writeback has made it clean.
test_cache_writeonly_mode() {
	[ "$TARGET" = pcache_rs ] || skip "upstream has only writeback"
	local back=${DM_PREFIX}wo_back cache dev tbl sz before log
	ensure_module
	wipe_cache
	sz=$(sectors "$BACKING_DEV")
	dms create "$back" --table "0 $sz linear $BACKING_DEV 0"
	cache=$(c_slice wo_pm "$C_CACHE_MIB")
	tbl="0 $sz $TARGET $cache /dev/mapper/$back 2 cache_mode writeonly"
	create wo "$tbl"
	dev=/dev/mapper/${DM_PREFIX}wo
	[[ $(dmsetup table "${DM_PREFIX}wo") == *"cache_mode writeonly"* ]] || fail "the table does not show cache_mode writeonly"
	expect_eq "cache mode bits" 3 $(((0x$(c_status wo cache_flags) >> 2) & 15))
	dd if=/dev/urandom of="$dev" bs=64k count=4 oflag=direct status=none
	dd if="$dev" of=/dev/null bs=64k count=4 skip=10000 iflag=direct status=none
	dd if="$dev" of=/dev/null bs=64k count=4 skip=10000 iflag=direct status=none
	expect_eq "read misses of an uncached range read twice" 8 "$(c_stat wo read_misses)"
	dd if="$dev" of=/dev/null bs=64k count=4 iflag=direct status=none
	expect_eq "read hits of written data" 4 "$(c_stat wo read_hits)"
	# Dirty data that stays dirty: the backing device fails from here on.
	dm_swap "$back" "0 $sz error"
	c_fio write "$dev" randwrite 0 32M 95
	dms remove "${DM_PREFIX}wo"
	before=$(kernel_log_lines)
	must_fail dms create "${DM_PREFIX}wo" --table "${tbl/cache_mode writeonly/cache_mode writeback}"
	log=$(kernel_log_since "$before")
	grep -q "Cache mode differs from the cache device's" <<<"$log" || fail "no cache mode error in the log: $log"
	dm_swap "$back" "0 $sz linear $BACKING_DEV 0"
	create wo "$tbl"
	c_fio verify "$dev" randwrite 0 32M 95
	c_wait_drained wo 300
	dms remove "${DM_PREFIX}wo"
	# Clean now: writeback mode takes the cache over, and the data is all there.
	create wo "${tbl/cache_mode writeonly/cache_mode writeback}"
	expect_eq "cache mode bits after the switch" 0 $(((0x$(c_status wo cache_flags) >> 2) & 15))
	c_fio verify "$dev" randwrite 0 32M 95
	dms remove "${DM_PREFIX}wo"
	dms remove "$back"
}

# The modes that write through: data written through the cache verifies, and the backing device
# alone holds all of it while the cache runs (nothing is dirty: no dirty bytes, the dirty tail
# reaches the key head); writethrough serves the written data from the cache, writearound does
# not until a read brought it in; a write-zeroes over cached data reads as zeros through the cache
# and on the backing device; after remove and create the cache starts empty and every byte still
# verifies; the mode is in cache_flags (1 and 2).
test_cache_write_through_modes() {
	[ "$TARGET" = pcache_rs ] || skip "upstream has only writeback"
	local mode bits dev hits zeros
	for mode in writethrough writearound; do
		bits=1
		[ "$mode" = writethrough ] || bits=2
		dev=$(c_new wt 2 cache_mode "$mode")
		expect_eq "$mode: cache mode bits" "$bits" $(((0x$(c_status wt cache_flags) >> 2) & 15))
		c_fio write "$dev" randwrite 0 32M 97
		c_fio write "$dev" write 64M 16M 98
		c_fio verify "$BACKING_DEV" randwrite 0 32M 97
		c_fio verify "$BACKING_DEV" write 64M 16M 98
		expect_eq "$mode: dirty bytes" 0 "$(c_stat wt dirty_bytes)"
		c_wait_drained wt 60
		# fio's verify read the regions back (which fills the cache in both modes): write anew.
		dd if=/dev/urandom of="$dev" bs=64k count=4 seek=2048 oflag=direct status=none
		dms message "${DM_PREFIX}wt" 0 stats reset
		dd if="$dev" of=/dev/null bs=64k count=4 skip=2048 iflag=direct status=none
		hits=4
		[ "$mode" = writethrough ] || hits=0
		expect_eq "$mode: read hits of written data" "$hits" "$(c_stat wt read_hits)"
		dd if="$dev" of=/dev/null bs=64k count=4 skip=2048 iflag=direct status=none
		expect_eq "$mode: read hits once read" $((hits + 4)) "$(c_stat wt read_hits)"
		# A write-zeroes over cached data: the worker zeroes the backing device, and the range
		# reads as zeros through the cache (which dropped or replaced what it held) and there.
		blkdiscard -f -z -o 128M -l 256K "$dev" || fail "$mode: write-zeroes failed"
		zeros=$(head -c 256K /dev/zero | cksum | cut -d' ' -f1,2)
		expect_eq "$mode: a zeroed range on the backing device" "$zeros" "$(region_sum "$BACKING_DEV" 128M 256K)"
		expect_eq "$mode: a zeroed range through the cache" "$zeros" "$(region_sum "$dev" 128M 256K)"
		dms remove "${DM_PREFIX}wt"
		create wt "$(c_table "/dev/mapper/${DM_PREFIX}wt_pm" 2 cache_mode "$mode")"
		dd if="$dev" of=/dev/null bs=64k count=4 skip=2048 iflag=direct status=none
		expect_eq "$mode: read misses after create (the cache starts empty)" 4 "$(c_stat wt read_misses)"
		c_fio verify "$dev" randwrite 0 32M 97
		c_fio verify "$dev" write 64M 16M 98
		dms remove "${DM_PREFIX}wt"
		dms remove "${DM_PREFIX}wt_pm"
	done
}

# dm_sysfs <dm name>: its sysfs directory (without udev, /dev/mapper/<name> is a node, not a link).
dm_sysfs() {
	echo "/sys/dev/block/$(dmsetup info -c --noheadings -o major,minor --separator : "$1")"
}

# dm_inflight_writes <dm name>: writes (discards included) in flight on it.
dm_inflight_writes() {
	awk '{ print $2 }' "$(dm_sysfs "$1")/inflight"
}

# A discard drops what the cache holds in its range, dirty data included, and goes on to the
# backing device. The backing device is a loop device over a file in guest memory (a discard
# punches a hole: zeros) under a dm-linear that stays suspended while the data is written and
# discarded, so writeback cannot copy anything first. The region kept is written first: the one
# writeback batch that can be planned before the discard (and then waits on the suspended device)
# is its. Afterwards the discarded region is zeros on the backing device (passed down, and
# writeback skipped its dirty data: only the other region's bytes were written back), and the
# other region holds its data.
test_cache_discard_drops_dirty_data_and_passes_down() {
	[ "$TARGET" = pcache_rs ] || skip "upstream does not take discards"
	local loop back=${DM_PREFIX}dc_back cache dev sz pid i
	ensure_module
	wipe_cache
	loop=$(make_loop 64)
	# Not zeros to begin with, so that a punched hole shows.
	dd if=/dev/zero bs=1M count=64 status=none | tr '\0' '\377' |
		dd of="$loop" bs=1M iflag=fullblock oflag=direct status=none
	sz=$(sectors "$loop")
	dms create "$back" --table "0 $sz linear $loop 0"
	cache=$(c_slice dc_pm "$C_CACHE_MIB")
	create dc "0 $sz $TARGET $cache /dev/mapper/$back"
	dev=/dev/mapper/${DM_PREFIX}dc
	dms suspend "$back"
	c_fio write "$dev" write 8M 8M 72
	c_fio write "$dev" randwrite 0 8M 71
	# -f: no probing for signatures, which would read (and miss) on the suspended device.
	blkdiscard -f -o 0 -l 8M "$dev" &
	pid=$!
	# In flight on our device: `map` dropped the keys and passed it on to the suspended device.
	for ((i = 0; i < 300; i++)); do
		[ "$(dm_inflight_writes "${DM_PREFIX}dc")" -gt 0 ] && break
		sleep 0.1
	done
	[ "$(dm_inflight_writes "${DM_PREFIX}dc")" -gt 0 ] || fail "the discard never reached the device"
	dms resume "$back"
	wait "$pid" || fail "blkdiscard failed"
	c_wait_drained dc 300
	for ((i = 0; i < 30; i++)); do [ "$(c_stat dc dirty_bytes)" = 0 ] && break; sleep 1; done
	expect_eq "dirty bytes after writeback" 0 "$(c_stat dc dirty_bytes)"
	expect_eq "bytes written back (the region not discarded)" $((8 << 20)) "$(c_stat dc bytes_written_back)"
	cmp <(head -c 8M /dev/zero) <(dd if="$dev" bs=1M count=8 iflag=direct status=none) ||
		fail "the discarded region does not read as zeros through the cache"
	c_fio verify "$dev" write 8M 8M 72
	dms remove "${DM_PREFIX}dc"
	dms remove "$back"
	cmp <(head -c 8M /dev/zero) <(dd if="$loop" bs=1M count=8 iflag=direct status=none) ||
		fail "the discarded region is not zeros on the backing device"
	c_fio verify "$loop" write 8M 8M 72
}

# REQ_OP_WRITE_ZEROES (blkdiscard -z) over cached data: the range reads as zeros, and still does
# after remove and create (the zeros are cached as data, so no older key can come back over
# them); the data around it is untouched.
# A 1 MiB read of which the cache holds every other 4 KiB has 128 gaps, more than `map` takes at
# once: the request worker sends them all to the backing device together. The read returns each
# block from where it lives, counts once as a miss, and fills the cache: read again, it is a hit.
test_cache_read_with_many_gaps() {
	local dev base=8 i misses hits
	ensure_module
	dd if=/dev/urandom of="$T_TMP/gaps-old" bs=1M count=1 status=none
	dd if="$T_TMP/gaps-old" of="$BACKING_DEV" bs=1M seek=$base oflag=direct conv=notrunc status=none ||
		fail "cannot write the backing device"
	dev=$(c_new gaps)
	dd if=/dev/urandom of="$T_TMP/gaps-new" bs=4k count=128 status=none
	cp "$T_TMP/gaps-old" "$T_TMP/gaps-want"
	for ((i = 0; i < 256; i += 2)); do
		dd if="$T_TMP/gaps-new" of="$dev" bs=4k skip=$((i / 2)) seek=$((base * 256 + i)) count=1 \
			oflag=direct conv=notrunc status=none || fail "write of block $i failed"
		dd if="$T_TMP/gaps-new" of="$T_TMP/gaps-want" bs=4k skip=$((i / 2)) seek=$i count=1 \
			conv=notrunc status=none
	done
	[ "$TARGET" = pcache_rs ] && misses=$(c_stat gaps read_misses)
	dd if="$dev" of="$T_TMP/gaps-got" bs=1M skip=$base count=1 iflag=direct status=none ||
		fail "the read with many gaps failed"
	cmp "$T_TMP/gaps-want" "$T_TMP/gaps-got" || fail "the read with many gaps returned wrong data"
	[ "$TARGET" = pcache_rs ] || return 0
	[ "$(c_stat gaps read_misses)" -gt "$misses" ] || fail "the read was not counted as a miss"
	hits=$(c_stat gaps read_hits)
	dd if="$dev" of="$T_TMP/gaps-got" bs=1M skip=$base count=1 iflag=direct status=none ||
		fail "the second read failed"
	cmp "$T_TMP/gaps-want" "$T_TMP/gaps-got" || fail "the second read returned wrong data"
	[ "$(c_stat gaps read_hits)" -gt "$hits" ] || fail "the misses did not fill the cache"
}

test_cache_write_zeroes_read_back_as_zeros() {
	[ "$TARGET" = pcache_rs ] || skip "upstream does not take write-zeroes"
	local dev tbl wz before after when
	dev=$(c_new wz)
	tbl=$(dmsetup table "${DM_PREFIX}wz")
	wz=$(cat "$(dm_sysfs "${DM_PREFIX}wz")/queue/write_zeroes_max_bytes")
	[ "$wz" -gt 0 ] || fail "the device takes no write-zeroes (backing: $(cat "/sys/block/$(basename "$BACKING_DEV")/queue/write_zeroes_max_bytes"))"
	c_fio write "$dev" randwrite 0 8M 73
	before="$(region_sum "$dev" 0 1M) $(region_sum "$dev" 5M 3M)"
	blkdiscard -f -z -o 1M -l 4M "$dev" || fail "blkdiscard -z failed"
	for when in "after write-zeroes" "after remove and create"; do
		cmp <(head -c 4M /dev/zero) <(dd if="$dev" bs=1M skip=1 count=4 iflag=direct status=none) ||
			fail "the zeroed range does not read as zeros $when"
		after="$(region_sum "$dev" 0 1M) $(region_sum "$dev" 5M 3M)"
		expect_eq "the data around the zeroed range $when" "$before" "$after"
		dms remove "${DM_PREFIX}wz"
		create wz "$tbl"
	done
}

# --- bad input ------------------------------------------------------------------------------------

# c_must_refuse <log text> <table line>: create fails, the kernel log has the text (pcache_rs only:
# upstream words its errors differently), and no device is left.
c_must_refuse() {
	local want=$1 tbl=$2 before log
	before=$(kernel_log_lines)
	must_fail dms create "${DM_PREFIX}bad" --table "$tbl"
	log=$(kernel_log_since "$before")
	echo "$log"
	if [ "$TARGET" = pcache_rs ]; then
		grep -qE -- "$want" <<<"$log" || fail "kernel log lacks '$want'"
		grep -q "device-mapper: table: .*: $TARGET: " <<<"$log" ||
			fail "no ti->error reported through device-mapper: table"
	fi
	! dmsetup info "${DM_PREFIX}bad" >/dev/null 2>&1 || fail "device ${DM_PREFIX}bad left behind"
}

test_cache_bad_messages() {
	local m before log
	c_new msg >/dev/null
	dms message "${DM_PREFIX}msg" 0 gc_percent 55
	expect_eq "gc_percent" 55 "$(c_status msg gc_percent)"
	for m in "gc_percent 91" "gc_percent 100" "gc_percent -1" "gc_percent abc" "gc_percent" \
		"gc_percent 5 6" "gc_percent 0x10" "data_crc maybe" "data_crc" "frobnicate 1" "" ; do
		before=$(kernel_log_lines)
		# shellcheck disable=SC2086 # the message is words on purpose
		# "--": a value like -1 must reach the target, not dmsetup's option parser.
		must_fail dms message -- "${DM_PREFIX}msg" 0 $m
		log=$(kernel_log_since "$before")
		if [ "$TARGET" = pcache_rs ] && [ -n "$m" ]; then
			grep -q "pcache_rs: " <<<"$log" || fail "message '$m' rejected without a log line"
		fi
		expect_eq "gc_percent after '$m'" 55 "$(c_status msg gc_percent)"
		expect_match "table after '$m'" "data_crc false" "$(dmsetup table "${DM_PREFIX}msg")"
	done
	dms message "${DM_PREFIX}msg" 0 gc_percent 90
	expect_eq "gc_percent" 90 "$(c_status msg gc_percent)"
	dms message "${DM_PREFIX}msg" 0 gc_percent 0
	expect_eq "gc_percent" 0 "$(c_status msg gc_percent)"
}

test_cache_non_dax_cache_device() {
	ensure_module
	local loop
	loop=$(make_loop 600)
	c_must_refuse "does not support DAX" "$(c_table "$loop")"
	if [ -n "${BRD_KO:-}" ] && [ -f "$BRD_KO" ] && [ ! -d /sys/module/brd ]; then
		insmod "$BRD_KO" rd_nr=1 rd_size=$((600 * 1024)) max_part=0
		c_must_refuse "does not support DAX" "$(c_table /dev/ram0)"
		rmmod brd
	fi
}

test_cache_too_small() {
	ensure_module
	wipe_cache
	local small
	small=$(c_slice small 256)
	c_must_refuse "too small" "$(c_table "$small")"
	dms remove "${DM_PREFIX}small"
	small=$(c_slice small 511)
	c_must_refuse "too small" "$(c_table "$small")"
}

# Non-zero bytes that are not a pcache superblock: refused, and left as they were.
test_cache_foreign_metadata() {
	ensure_module
	wipe_cache
	local pm sum
	pm=$(c_slice fm "$C_CACHE_MIB")
	head -c 4096 /dev/urandom | dd of="$pm" bs=4096 seek=1 oflag=direct status=none
	sum=$(head -c 65536 "$pm" | sha256sum)
	c_must_refuse "pcache_sb" "$(c_table "$pm")"
	expect_eq "pmem after refusal" "$sum" "$(head -c 65536 "$pm" | sha256sum)"
	# A filesystem on the would-be cache device is foreign metadata too.
	mkfs.ext4 -q -F "$pm"
	c_must_refuse "pcache_sb" "$(c_table "$pm")"
	fsck.ext4 -fn "$pm" || fail "the ext4 on the refused device was modified"
}

# c_corrupt <dev> <byte offset> <bytes>: overwrite with random bytes.
c_corrupt() {
	head -c "$3" /dev/urandom | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
	sync
}

test_cache_corrupt_slots() {
	local dev pm tbl img=$T_TMP/meta.img
	dev=$(c_new cs)
	pm=/dev/mapper/${DM_PREFIX}cs_pm
	c_fio write "$dev" randwrite 0 16M 61
	dms message "${DM_PREFIX}cs" 0 gc_percent 60
	tbl=$(dmsetup table "${DM_PREFIX}cs")
	dms remove "${DM_PREFIX}cs"
	# The formatted metadata (superblock, cache_info, ctrl, first segment's header), to restore.
	dd if="$pm" of="$img" bs=4096 count=8 iflag=direct status=none

	restore() { dd if="$img" of="$pm" bs=4096 count=8 oflag=direct status=none; }
	# One bad slot of a pair: the other one serves, every byte is still there.
	local off
	for off in $((0x2000)) $((0x3000)); do
		c_corrupt "$pm" $((off + 8)) 64
		create cs "$tbl" || fail "cache_info slot at $off corrupt: attach failed, the other slot should serve"
		c_fio verify "$dev" randwrite 0 16M 61
		dms remove "${DM_PREFIX}cs"
		restore
	done
	# Both slots bad: refused, naming the structure, nothing overwritten.
	local what sum
	for what in "$((0x2000)) 8192 pcache_cache_info" "$((0x4000)) 4096 (key|dirty)_tail_pos" \
		"$((0x5000)) 8192 pcache_segment_info" "$((0x1000)) 4096 pcache_sb"; do
		set -- $what
		c_corrupt "$pm" "$1" "$2"
		sum=$(head -c 65536 "$pm" | sha256sum)
		c_must_refuse "$3" "$tbl"
		expect_eq "pmem after refusing corrupt $3" "$sum" "$(head -c 65536 "$pm" | sha256sum)"
		restore
	done
	# Restored: attaches again with every byte.
	create cs "$tbl"
	c_fio verify "$dev" randwrite 0 16M 61
}
