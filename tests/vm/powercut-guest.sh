#!/usr/bin/env bash
# Guest half of tests/powercut. Runs inside qemu/run-vm.
#
#   tests/vm/powercut-guest.sh write <dir>
#   tests/vm/powercut-guest.sh verify <dir> <cut> [<cut> ...]
#
# write: formats the cache, writes regions of the device with fio (crc32c and offset in every block),
# some followed by fsync (a FLUSH for the device), some not, and cuts power at six points of
# different kinds. <dir>/state (in the repository, so the host sees it) records which regions were
# durable (an fsync completed after their last write), with a checksum of their content, and which
# were still pending. One region is zeroed with a write-zeroes (blkdiscard -z) before cut 3. Some writes overwrite a durable region: fio's verify alone would pass the old
# content too (each block's header holds its offset and checksum, not which write it came from), so
# the hash is what tells the new content from the old. Cuts 1-5 are
# snapshots: the guest asks through <dir>/snap.request, and the host (tests/powercut-snapshot) stops the
# VM, copies the NVDIMM file, the backing disk and the state, and resumes it; the fio jobs in flight
# are cut wherever they were. Between cuts the cache is replayed (remove and create) and its table
# reloaded, so later cuts hit a replayed cache. Cut 6 is a real one: `echo b > /proc/sysrq-trigger`
# with writes and fsyncs in flight (QEMU runs with -no-reboot and exits).
#
# verify: for each cut, in the order of the devices ($PMEM_DEV with $BACKING_DEV for the first,
# then $EXTRA_PMEM_DEVS with $EXTRA_DISKS), creates the cache on what the cut left, checks that every
# region durable at the cut reads back exactly, drains writeback (the dirty tail reaches the key head),
# removes the cache and checks that the backing device alone holds every durable region. "Holds"
# means that fio's verify passes and the content hashes to what was recorded. A cut is
# named by its number; its state file is <dir>/state for the real cut (6) and <dir>/snapK.state for
# the snapshots. Each result is one line "result <cut> ok|fail <reason>" in <dir>/results.
set -uo pipefail
mode=$1
dir=$2
shift 2

# The fio region job, the region checksum, wait_drained, dms and SPLAT_RE are the VM suite's.
. "$(dirname "$0")/lib.sh"

REGIONS=16     # regions of the device the test writes, REGION_MIB each
REGION_MIB=4
CACHE_MIB=512  # the cache: a dm-linear slice of the pmem (upstream's minimum size)
SNAPSHOTS=5    # cuts taken as snapshots; the real cut is number SNAPSHOTS + 1

say() { echo "powercut($mode): $*"; }

# pc_job <dev> <region> <rw> <seed>: sets job to the fio options of one region's data job.
pc_job() { fio_region_job "r$2" "$1" "$3" "$(($2 * REGION_MIB))M" "${REGION_MIB}M" "$4"; }

# pc_write <dev> <region> <rw> <seed> [fio args]: write one region; output in /tmp/pc-fio-<region>.out.
pc_write() {
	local dev=$1 r=$2 rw=$3 seed=$4 job
	shift 4
	pc_job "$dev" "$r" "$rw" "$seed"
	fio "${job[@]}" --do_verify=0 --output-format=terse --terse-version=3 "$@" \
		>"/tmp/pc-fio-$r.out" 2>&1
}

# region_hash <dev> <region>: checksum of the region's content (region_sum), without spaces.
region_hash() { region_sum "$1" "$(($2 * REGION_MIB))M" "${REGION_MIB}M" | tr ' ' :; }

# verify_regions <dev>: check every region given on stdin as "<region> <rw> <seed> <sum>": fio's
# verify, in one fio run (a fio start costs seconds under TCG), and the content hash. A region
# whose last durable write was a write-zeroes (rw "zero") has no fio headers: the hash alone
# checks it. Prints the number of regions checked, or the reason of the first failure (and
# returns 1).
verify_regions() {
	local r rw seed sum n=0 job all=() sums=()
	while read -r r rw seed sum; do
		if [ "$rw" != zero ]; then
			pc_job "$1" "$r" "$rw" "$seed"
			all+=("${job[@]}" --verify_only=1)
		fi
		sums+=("$r $sum")
		n=$((n + 1))
	done
	[ ${#all[@]} = 0 ] || fio "${all[@]}" >/tmp/pc-fio-verify.out 2>&1 ||
		{ echo "fio verify: $(grep -m2 -i 'verify\|bad\|err' /tmp/pc-fio-verify.out | tr '\n' ' ')"; return 1; }
	for r in "${sums[@]}"; do
		[ "$(region_hash "$1" "${r%% *}")" = "${r#* }" ] ||
			{ echo "region ${r%% *} does not hold its last durable write (content hash differs)"; return 1; }
	done
	echo "$n"
}

# Only what the kernel logged after this script started counts (boot messages mention lockdep).
log_base=$(dmesg | wc -l)
splat() { dmesg | tail -n +"$((log_base + 1))" | grep -E "$SPLAT_RE" | head -n 3; }

# Regions whose last record in a state file is "durable": "<region> <rw> <seed> <sum>".
durable() {
	awk '$1 == "durable" { d[$2] = $3 " " $4 " " $5 } $1 == "pending" { delete d[$2] }
		END { for (r in d) print r, d[r] }' "$1" | sort -n
}

# pc_table <cache dev> <backing dev>: the table line of the cache.
pc_table() { echo "0 $(blockdev --getsz "$2") pcache_rs $1 $2"; }

# create_cache <name> <pmem dev> <backing dev>: the cache over a CACHE_MIB slice of the pmem.
create_cache() {
	dms create "$1_pm" --table "0 $((CACHE_MIB * 2048)) linear $2 0" || return 1
	dms create "$1" --table "$(pc_table "/dev/mapper/$1_pm" "$3")"
}

[ -d /sys/module/dm_pcache_rs ] || insmod "$PCACHE_KO" || { say "insmod $PCACHE_KO failed"; exit 1; }

if [ "$mode" = write ]; then
	state=$dir/state
	name=pcut
	dev=/dev/mapper/$name
	die() {
		say "FAIL: $*"
		echo "fail $*" >>"$state"
		dmesg | tail -n 40 | sed 's/^/    dmesg| /'
		exit 1
	}
	record() { echo "$*" >>"$state" && sync; }
	check_splat() { local s; s=$(splat); [ -z "$s" ] || die "kernel splat: $s"; }

	dd if=/dev/zero of="$PMEM_DEV" bs=1M count=64 oflag=direct status=none
	: >"$state"
	create_cache "$name" "$PMEM_DEV" "$BACKING_DEV" || die "create: $(dmesg | grep pcache_rs | tail -n 3)"
	# GC starts as soon as 10% of the segments are used, so it runs during the cuts.
	dms message "$name" 0 gc_percent 10 || die "gc_percent"

	# snapshot <cut> <kind>: record the cut, then have the host copy the devices and the state.
	snapshot() {
		record "cut $1 $2"
		check_splat
		echo "$1" >"$dir/snap.request.tmp" && mv "$dir/snap.request.tmp" "$dir/snap.request" || die "snapshot request"
		for _ in $(seq 3000); do
			[ -f "$dir/snap$1.done" ] && { say "cut $1 ($2) taken"; return; }
			sleep 0.2
		done
		die "the host did not take snapshot $1"
	}

	step=0
	unflushed=()
	# next_region [<region>]: the next step's region (a new one, or <region> to overwrite), seed and rw.
	next_region() {
		step=$((step + 1)); r=${1:-$(((step * 5) % REGIONS))}; seed=$((step * 101))
		rw=randwrite; [ $((step % 3)) != 0 ] || rw=write
	}
	# made_durable <region> <rw> <seed>...: record regions durable, with the hash of their content.
	made_durable() {
		local u
		for u in "$@"; do
			record "durable $u $(region_hash "$dev" "${u%% *}")"
		done
	}
	# write_step flush|noflush [<region>]: one region, recorded durable (with every unflushed write
	# before it) only once its fsync has completed.
	write_step() {
		next_region "${2:-}"
		record "pending $r"
		if [ "$1" = flush ]; then
			pc_write "$dev" "$r" "$rw" "$seed" --end_fsync=1 || die "write step $step: $(tail -n 3 "/tmp/pc-fio-$r.out")"
			made_durable "${unflushed[@]}" "$r $rw $seed"
			unflushed=()
		else
			pc_write "$dev" "$r" "$rw" "$seed" || die "write step $step: $(tail -n 3 "/tmp/pc-fio-$r.out")"
			unflushed+=("$r $rw $seed")
		fi
	}
	# in_flight_step <region|""> [fio args]: start a flushed write (of a new region, or over
	# <region>) in the background, pending until it is waited for.
	in_flight_step() {
		next_region "$1"
		shift
		record "pending $r"
		pc_write "$dev" "$r" "$rw" "$seed" --end_fsync=1 "$@" &
		bg_pid=$! bg="$r $rw $seed"
	}
	# zero_step <region>: a write-zeroes over the region (blkdiscard -z), then an fsync: the
	# region is durable as zeros, and so is every unflushed write before it.
	zero_step() {
		local r=$1
		record "pending $r"
		blkdiscard -f -z -o "$((r * REGION_MIB))M" -l "${REGION_MIB}M" "$dev" || die "write-zeroes of region $r"
		dd if=/dev/null of="$dev" conv=fsync status=none || die "fsync after the write-zeroes of region $r"
		[ "$(region_hash "$dev" "$r")" = "$(head -c "${REGION_MIB}M" /dev/zero | cksum | tr ' ' :)" ] ||
			die "region $r does not read as zeros after a write-zeroes"
		made_durable "${unflushed[@]}" "$r zero 0"
		unflushed=()
	}
	finish_in_flight() {
		wait "$bg_pid" || die "in-flight write of region ${bg%% *}: $(tail -n 3 "/tmp/pc-fio-${bg%% *}.out")"
		made_durable "${unflushed[@]}" "$bg"
		unflushed=()
	}

	# Cut 1: during a write, with durable and unflushed regions behind it.
	write_step noflush; write_step flush; write_step noflush
	in_flight_step ""
	sleep 2
	snapshot 1 during-write
	finish_in_flight
	# Cut 2: right after an fsync completed, with writeback and GC running in the background.
	write_step noflush; write_step flush
	snapshot 2 after-fsync
	# Cut 3: a completed write after the last fsync (nothing says it is durable), and a durable
	# write-zeroes over step 1's region (the zeros must come back, not the data under them).
	zero_step $((1 * 5 % REGIONS))
	write_step flush; write_step noflush
	snapshot 3 unflushed-write
	# Cut 4: after a replay (remove and create with dirty data), during a write.
	dms remove "$name" || die "remove"
	dms create "$name" --table "$(pc_table "/dev/mapper/${name}_pm" "$BACKING_DEV")" ||
		die "create after remove: $(dmesg | grep pcache_rs | tail -n 3)"
	write_step flush
	in_flight_step ""
	sleep 1
	snapshot 4 replayed-during-write
	finish_in_flight
	# Cut 5: after a table reload, while a durable region (step 2's) is being overwritten, with
	# fsyncs between.
	table=$(dmsetup table "$name")
	dms suspend "$name" && dms load "$name" --table "$table" && dms resume "$name" || die "table reload"
	write_step noflush; write_step flush
	in_flight_step $((2 * 5 % REGIONS)) --fsync=4
	sleep 2
	snapshot 5 reloaded-overwrite-with-fsyncs
	finish_in_flight
	# Cut 6, the real one: power goes with writes and fsyncs in flight, after a durable overwrite of
	# step 1's region: the replay must return the new content, not the old.
	write_step flush $((1 * 5 % REGIONS)); write_step noflush
	in_flight_step "" --fsync=2
	sleep 2
	record "cut $((SNAPSHOTS + 1)) sysrq-during-write"
	check_splat
	echo b >/proc/sysrq-trigger
	sleep 60
	die "still alive after sysrq b"
fi

[ "$mode" = verify ] || { say "unknown mode '$mode'"; exit 2; }
results=$dir/results
: >"$results"
read -r -a pmems <<<"$PMEM_DEV $EXTRA_PMEM_DEVS"
read -r -a disks <<<"$BACKING_DEV $EXTRA_DISKS"
[ "${#pmems[@]}" = $# ] && [ "${#disks[@]}" = $# ] ||
	{ say "$# cuts but ${#pmems[@]} pmem devices and ${#disks[@]} disks"; exit 1; }
i=0
for cut in "$@"; do
	pm=${pmems[i]} disk=${disks[i]} name=pcv$cut dev=/dev/mapper/pcv$cut
	i=$((i + 1))
	state=$dir/snap$cut.state
	[ -f "$state" ] || state=$dir/state
	kind=$(awk -v c="$cut" '$1 == "cut" && $2 == c { print $3 }' "$state")
	t0=$SECONDS
	# verify_cut: the checks for one cut; prints the reason of the first failure.
	verify_cut() {
		local n total
		[ -n "$kind" ] || { echo "the state file $state does not record cut $cut"; return 1; }
		total=$(durable "$state" | wc -l)
		[ "$total" -gt 0 ] || { echo "no region was durable at the cut"; return 1; }
		create_cache "$name" "$pm" "$disk" ||
			{ echo "create after the cut failed: $(dmesg | grep pcache_rs | tail -n 2 | tr '\n' ' ')"; return 1; }
		n=$(durable "$state" | verify_regions "$dev") || { echo "in the cache: $n"; return 1; }
		[ "$n" = "$total" ] || { echo "verified $n of $total durable regions"; return 1; }
		wait_drained "$name" 600 || { echo "writeback did not drain: $(dmsetup status "$name")"; return 1; }
		dms remove "$name" || { echo "remove failed"; return 1; }
		dms remove "${name}_pm" || { echo "remove of the slice failed"; return 1; }
		n=$(durable "$state" | verify_regions "$disk") || { echo "on the backing device after writeback: $n"; return 1; }
		[ "$n" = "$total" ] || { echo "verified $n of $total regions on the backing device"; return 1; }
		s=$(splat)
		[ -z "$s" ] || { echo "kernel splat: $s"; return 1; }
		echo "$total durable regions intact in the cache and, after writeback, on the backing device"
	}
	if why=$(verify_cut); then
		say "cut $cut ($kind): ok, ${why} ($((SECONDS - t0)) s)"
		echo "result $cut ok $kind: $why" >>"$results"
	else
		say "cut $cut ($kind): FAIL: $why"
		echo "result $cut fail $kind: $why" >>"$results"
		dmesg | tail -n 20 | sed 's/^/    dmesg| /'
	fi
	sync
done
exit 0
