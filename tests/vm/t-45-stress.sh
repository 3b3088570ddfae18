# Everything at once, on a kernel with KASAN and lockdep: the harness fails a test whose kernel log
# has a splat, so a race between map, the request worker, the fills of read misses, the background
# work, messages, status and suspend shows up here.
# shellcheck shell=bash

# test_cache_stress_all_at_once: four fio writers with verification (reads back what they wrote
# while they write) and one reader of a region the cache has never seen (every read misses, goes
# to the backing device in flight and fills the cache), while gc_percent and data_crc change by
# message, `dmsetup status` runs in a loop and the device is suspended and resumed. The second pair
# of writers and the reader go through io_uring: their requests come with REQ_NOWAIT, served in
# map or (the reader's misses) ended with EAGAIN and retried from io_uring's workers. gc_percent 0
# among the settings makes GC reclaim written-back segments, so reads of them miss too. At the end
# every region reads back what was last written there.
S_MIB=${S_MIB:-16}
test_cache_stress_all_at_once() {
	local dev tbl raw=$BACKING_DEV name=stress stop=$T_TMP/stress.stop pids=() job regions=() i
	local base=$((5 * S_MIB))
	# The reader's region, written to the backing device before the cache exists.
	c_job "$raw" write "${base}M" "${S_MIB}M" 4500
	c_fio_run "backing region write" "${job[@]}" --do_verify=0
	c_sum_record "$raw" "write ${base}M ${S_MIB}M 4500"
	dev=$(c_new "$name" 2 data_crc true)
	rm -f "$stop"
	(while [ ! -e "$stop" ]; do dmsetup status "${DM_PREFIX}$name" >/dev/null || exit 1; done) &
	pids+=($!)
	(
		i=0
		while [ ! -e "$stop" ]; do
			dms message "${DM_PREFIX}$name" 0 gc_percent "$(((i % 3) * 45))" || exit 1
			dms message "${DM_PREFIX}$name" 0 data_crc "$([ $((i % 2)) = 0 ] && echo false || echo true)" || exit 1
			i=$((i + 1))
			sleep 0.5
		done
	) &
	pids+=($!)
	(
		sleep 4
		dms suspend "${DM_PREFIX}$name" || exit 1
		dmsetup status "${DM_PREFIX}$name" >/dev/null || exit 1
		sleep 1
		dms resume "${DM_PREFIX}$name" || exit 1
	) &
	pids+=($!)
	local all=()
	# Two regions of two writers each: each writer writes its half, then reads it back.
	for i in 0 1; do
		c_job "$dev" randwrite "$((i * S_MIB))M" "${S_MIB}M" "$((4400 + i))"
		all+=("${job[@]}")
		[ "$i" = 0 ] || all+=(--ioengine=io_uring)
		regions+=("randwrite $((i * S_MIB))M ${S_MIB}M $((4400 + i))")
	done
	c_job "$dev" write "${base}M" "${S_MIB}M" 4500
	all+=("${job[@]}" --verify_only=1 --ioengine=io_uring)
	c_fio_run "4 writers and 2 readers of misses, with messages, status and a suspend, on $dev" "${all[@]}"
	touch "$stop"
	for i in "${pids[@]}"; do wait "$i" || fail "a background loop failed (status, message or suspend)"; done
	echo "after the stress: $(dmsetup status "${DM_PREFIX}$name")"
	[ "$(c_stat "$name" read_misses)" -gt 0 ] || fail "no read missed: the readers did not reach the backing device"
	for i in 0 1; do c_sum_record "$dev" "${regions[$i]}"; done
	# Everything again from a fresh instance: what the cache holds was logged and replays.
	tbl=$(dmsetup table "${DM_PREFIX}$name")
	dms remove "${DM_PREFIX}$name"
	create "$name" "$tbl"
	c_fio_verify_all "$dev" "${regions[@]}" "write ${base}M ${S_MIB}M 4500"
}

# test_cache_write_through_racing: in each mode that writes through, four jobs write and read the
# same 4 MiB at random at once through io_uring (whose writes and read misses end with EAGAIN in
# map and come back from its workers), three reads to a write (writes through in flight overlap each other
# and the reads' misses),
# beside a verified writer of a region of its own and `dmsetup status` in a loop. Overlapping
# writes in flight may land in either order, and a read beside a write may bring back either
# version; whatever landed, the cache must hold only what the backing device holds: the region
# reads the same through the cache (which serves some of it, counted as hits) and from the backing
# device. Then the verified region reads back what was written.
test_cache_write_through_racing() {
	[ "$TARGET" = pcache_rs ] || skip "upstream has only writeback"
	local mode dev stop=$T_TMP/wt.stop pid job all region="randwrite 16M 8M 4600" via raw
	for mode in writethrough writearound; do
		dev=$(c_new wtr 2 cache_mode "$mode")
		rm -f "$stop"
		(while [ ! -e "$stop" ]; do dmsetup status "${DM_PREFIX}wtr" >/dev/null || exit 1; done) &
		pid=$!
		# shellcheck disable=SC2086 # region is "<rw> <offset> <size> <seed>"
		c_job "$dev" $region
		all=("${job[@]}" --do_verify=1)
		all+=(--name=race --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=8 --rw=randrw --rwmixread=75
			--bsrange=4k-64k --blockalign=4k --offset=0 --size=4M --numjobs=4 --time_based
			--runtime=5 --randseed=4601)
		c_fio_run "$mode: 4 racing jobs on one region beside a verified writer" "${all[@]}"
		touch "$stop"
		wait "$pid" || fail "$mode: dmsetup status failed during the race"
		dms message "${DM_PREFIX}wtr" 0 stats reset
		# In 4 KiB reads, so that each one the cache holds whole counts as a hit.
		via=$(dd if="$dev" bs=4k count=1024 iflag=direct status=none | cksum)
		[ "$(c_stat wtr read_hits)" -gt 0 ] || fail "$mode: the cache held none of the raced region"
		raw=$(dd if="$BACKING_DEV" bs=4k count=1024 iflag=direct status=none | cksum)
		expect_eq "$mode: the raced region through the cache and on the backing device" "$raw" "$via"
		expect_eq "$mode: it again, once the misses filled" "$raw" "$(region_sum "$dev" 0 4M)"
		c_sum_record "$dev" "$region"
		c_fio_verify_all "$BACKING_DEV" "$region"
		dms remove "${DM_PREFIX}wtr"
		dms remove "${DM_PREFIX}wtr_pm"
	done
}
