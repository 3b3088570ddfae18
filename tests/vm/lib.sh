# The VM test framework: sourced by tests/vm/run inside the guest. Not run directly.
# shellcheck shell=bash
#
# A test is a function named test_<name> in a tests/vm/t-*.sh file. Each runs in its own subshell
# with `set -eE -o pipefail`; the first failing command fails it (the reason names the line), or
# it calls `fail "reason"` / `skip "reason"`. Around every test the kernel log is scanned: any new
# WARNING, BUG, KASAN, lockdep or oops report fails the test, whatever the test itself said.

# Kernel log lines that mean a kernel bug, whichever test triggered them.
SPLAT_RE='WARNING:|BUG:|KASAN|possible circular locking|lockdep|Oops|Call Trace|general protection|UBSAN|kernel BUG'

T_PASSED=0
T_FAILED=0
T_SKIPPED=0
T_FAILED_NAMES=()
T_TMP=$(mktemp -d /tmp/pcache-tests.XXXXXX)

# Device-mapper names created by tests start with this, so cleanup finds them.
DM_PREFIX=pct_

# dmsetup that never waits for udev (udev's dm rules are not running in the guest).
dms() { dmsetup --noudevsync "$@"; }

kmsg() { echo "pcache-test: $*" >/dev/kmsg 2>/dev/null || true; }

# Kernel log since a marker: `kmsg_mark ID` writes one, `kernel_log_since ID` prints what followed
# the last one. Every process start is slow under TCG with KASAN, so this costs one dmesg.
# (`kernel_log_lines` / `kernel_log_since N`, by line count, work too.)
kmsg_mark() { kmsg "mark $1"; }
kernel_log_lines() { dmesg | wc -l; }
kernel_log_since() {
	local log
	if [[ $1 =~ ^[0-9]+$ ]]; then
		dmesg | tail -n +"$(($1 + 1))"
		return
	fi
	log=$(dmesg)
	printf '%s\n' "${log##*pcache-test: mark $1}"
}

fail() {
	echo "$*" >"$T_TMP/reason"
	exit 1
}
skip() {
	echo "$*" >"$T_TMP/skip"
	exit 0
}
# Assertions. Each names what it compared, so a FAIL line says what broke.
expect_eq() { # <what> <expected> <actual>
	[ "$2" = "$3" ] || fail "$1: expected '$2', got '$3'"
}
expect_match() { # <what> <regex> <actual>
	[[ $3 =~ $2 ]] || fail "$1: '$3' does not match /$2/"
}

# Remove every device-mapper device and loop device a test left behind.
cleanup_devices() {
	local name left
	for _ in 1 2 3; do
		# Reverse order: devices stacked on others (made later) go first.
		left=$(dmsetup ls 2>/dev/null | while read -r name _; do
			[[ $name == "$DM_PREFIX"* ]] && echo "$name"; done | tac)
		[ -n "$left" ] || break
		for name in $left; do dms remove --retry "$name" >/dev/null 2>&1 || true; done
	done
	if [ -f "$T_TMP/loops" ]; then
		while read -r l; do losetup -d "$l" 2>/dev/null || true; done <"$T_TMP/loops"
		rm -f "$T_TMP/loops"
	fi
}

# run_test <function>: run one test and print its PASS/FAIL/SKIP line.
run_test() {
	local fn=$1 name=${1#test_} rc klog splat out=$T_TMP/$1.out
	rm -f "$T_TMP/reason" "$T_TMP/skip"
	kmsg "begin $name"
	kmsg_mark "test-$name"
	local t0=$SECONDS
	(
		set -eE -o pipefail
		trap 'rc=$?; [ -f "$T_TMP/reason" ] || echo "line $LINENO: $BASH_COMMAND (exit $rc)" >"$T_TMP/reason"' ERR
		"$fn"
	) >"$out" 2>&1
	rc=$?
	cleanup_devices >>"$out" 2>&1
	klog=$(kernel_log_since "test-$name")
	splat=
	[[ $klog =~ $SPLAT_RE ]] && splat=$(grep -E "$SPLAT_RE" <<<"$klog" | head -n 3)
	kmsg "end $name"
	local took=$((SECONDS - t0))s
	if [ -n "$splat" ]; then
		T_FAILED=$((T_FAILED + 1)); T_FAILED_NAMES+=("$name")
		echo "FAIL $name (kernel log: $(echo "$splat" | head -n1 | sed 's/^\[[^]]*\] //'))"
		sed 's/^/    dmesg| /' <<<"$klog" | tail -n 60
	elif [ "$rc" != 0 ]; then
		T_FAILED=$((T_FAILED + 1)); T_FAILED_NAMES+=("$name")
		echo "FAIL $name ($(cat "$T_TMP/reason" 2>/dev/null || echo "exit $rc"))"
		tail -n 20 "$out" | sed 's/^/    | /'
	elif [ -f "$T_TMP/skip" ]; then
		T_SKIPPED=$((T_SKIPPED + 1))
		echo "SKIP $name ($(cat "$T_TMP/skip"))"
	else
		T_PASSED=$((T_PASSED + 1))
		echo "PASS $name ($took)"
	fi
}

# The test functions of a file, in the order they are written.
tests_in() { sed -n 's/^\(test_[A-Za-z0-9_]*\)[[:space:]]*()[[:space:]]*{.*/\1/p' "$1"; }

summary() {
	[ "$T_SKIPPED" = 0 ] || echo "($T_SKIPPED skipped)"
	echo "$T_PASSED passed, $T_FAILED failed"
	rm -rf "$T_TMP"
	[ "$T_FAILED" = 0 ]
}

# --- helpers for the tests ----------------------------------------------------------------------

# Sectors of a block device (the two test devices are looked up once).
declare -A SECTORS_OF
sectors() {
	[ -n "${SECTORS_OF[$1]:-}" ] || SECTORS_OF[$1]=$(blockdev --getsz "$1")
	echo "${SECTORS_OF[$1]}"
}

# A fresh cache device: the C target formats the cache when it finds no superblock, and would
# otherwise replay whatever an earlier test left on the pmem.
wipe_cache() { dd if=/dev/zero of="$PMEM_DEV" bs=1M count=64 oflag=direct status=none; }

# linear_slice <name> <device> <MiB> [<offset MiB>]: a dm-linear slice of a device named
# $DM_PREFIX<name> (DAX passes through dm-linear); prints its path.
linear_slice() {
	dms create "$DM_PREFIX$1" --table "0 $(($3 * 2048)) linear $2 $((${4:-0} * 2048))" || return 1
	echo "/dev/mapper/$DM_PREFIX$1"
}

# A loop device over a file in guest memory: a block device that is not DAX-capable.
make_loop() { # <MiB>
	local f l
	f=$(mktemp -p "$T_TMP" loop.XXXXXX)
	truncate -s "$1M" "$f"
	l=$(losetup --show -f "$f")
	echo "$l" >>"$T_TMP/loops"
	echo "$l"
}

# The table line of our target over the two devices, with optional arguments appended.
table() { # [opt args...]
	echo "0 $(sectors "$BACKING_DEV") $TARGET $PMEM_DEV $BACKING_DEV $*"
}

# Create a device; the name gets the test prefix. Prints nothing, fails like dmsetup.
create() { # <name> <table line>
	dms create "$DM_PREFIX$1" --table "$2"
}

# Load the module under test unless it is loaded already.
ensure_module() {
	[ -d "/sys/module/$MODULE_NAME" ] && return 0
	[ -f "$MODULE_KO" ] || fail "module $MODULE_KO is not built"
	insmod "$MODULE_KO"
}

# Run a command that must fail; prints its output.
must_fail() {
	if "$@" 2>&1; then
		fail "succeeded, but should have failed: $*"
	fi
	return 0
}

# --- regions written by fio, shared with the power-cut guest -------------------------------------

# fio_region_job <name> <dev> <rw> <offset> <size> <seed>: sets job to the fio options of the data
# job of one region: numjobs 2, each job on one half of it, bs 4k..1M, and every block carries its
# offset and a crc32c (verify=crc32c). Add --do_verify=0 to write, --verify_only=1 to check.
fio_region_job() {
	local half
	half=$(($(c_bytes "$5") / 2))
	job=(--name="$1" --filename="$2" --direct=1 --ioengine=libaio --iodepth=8
		--rw="$3" --bsrange=4k-1m --blockalign=4k --numjobs=2
		--offset="$4" --size="$half" --offset_increment="$half"
		--randseed="$6" --verify=crc32c --verify_fatal=1 --verify_backlog=0 --verify_state_save=0
		--group_reporting)
}

# region_sum <dev> <offset> <size>: a checksum of a region's content, read with O_DIRECT. fio's
# verify alone passes stale data (each block's header holds its offset and a checksum of itself,
# not which write it came from): the checksum tells a region's last write from an older one.
region_sum() {
	dd if="$1" bs=1M skip="$(c_bytes "$2")" count="$(c_bytes "$3")" iflag=direct,skip_bytes,count_bytes \
		status=none | cksum | cut -d' ' -f1,2
}

# wait_drained <dm name> <seconds>: wait until writeback has caught up (dirty tail == key head);
# returns 1 if it did not.
wait_drained() {
	local i kh dt
	for ((i = 0; i < $2; i++)); do
		read -r kh dt <<<"$(dmsetup status "$1" | awk '{ print $10, $11 }')"
		[ -n "$kh" ] && [ "$kh" = "$dt" ] && return 0
		sleep 1
	done
	return 1
}

# --- the cache under test ------------------------------------------------------------------------
#
# The cache is a 512 MiB dm-linear slice of the pmem (DAX passes through dm-linear): upstream's
# minimum size, so that writing more than the cache holds stays quick under TCG. Data is written by
# fio with verify=crc32c (every block carries its offset and a checksum) and checked later by the
# same job with --verify_only, on whichever device must hold it.

C_CACHE_MIB=512

# c_slice <name> <MiB> [<offset MiB>]: a dm-linear slice of the pmem; prints its path.
c_slice() { linear_slice "$1" "$PMEM_DEV" "$2" "${3:-0}"; }

# c_table <cache dev> [opt args...]: our target over <cache dev> and the backing device.
c_table() {
	local cache=$1
	shift
	echo "0 $(sectors "$BACKING_DEV") $TARGET $cache $BACKING_DEV $*"
}

# c_new <name> [opt args...]: a fresh cache (zeroed slice) named pct_<name>; prints its path.
c_new() {
	local name=$1 cache
	shift
	ensure_module
	wipe_cache
	cache=$(c_slice "${name}_pm" "$C_CACHE_MIB")
	create "$name" "$(c_table "$cache" "$@")"
	echo "/dev/mapper/$DM_PREFIX$name"
}

# c_status <name> <field>: one field of the upstream status line
#   sb_flags seg_num n_segs used_segs gc_percent cache_flags key_head dirty_tail key_tail
c_status() {
	local f
	case "$2" in
	sb_flags) f=4 ;; seg_num) f=5 ;; n_segs) f=6 ;; used_segs) f=7 ;; gc_percent) f=8 ;;
	cache_flags) f=9 ;; key_head) f=10 ;; dirty_tail) f=11 ;; key_tail) f=12 ;;
	*) fail "c_status: unknown field $2" ;;
	esac
	dmsetup status "$DM_PREFIX$1" | awk -v f="$f" '{ print $f }'
}

# dm_swap <dm device> <table>: replace its table in the order suspend, load, resume (the device
# keeps its IO queued meanwhile).
dm_swap() {
	dms suspend "$1" && dms load "$1" --table "$2" && dms resume "$1"
}

# c_stat <name> <statistic>...: statistics pcache_rs appends to its status line: after upstream's
# nine fields comes their count, then the values in the order of STATUS_STATS
# (cache_core/stats.rs). Several are printed space-separated, all from one status line. Fails if
# the line does not have them.
C_STATS=(read_hits read_misses write_hits write_misses dirty_bytes bytes_written_back gc_ksets
	crc_errors writeback_errors backing_errors gc_kept_bytes)
c_stat() {
	local name=$1 s i f fields=
	shift
	for s in "$@"; do
		f=
		for i in "${!C_STATS[@]}"; do [ "${C_STATS[$i]}" = "$s" ] && f=$((14 + i)); done
		[ -n "$f" ] || fail "c_stat: unknown statistic $s"
		fields+="${fields:+ }$f"
	done
	dmsetup status "$DM_PREFIX$name" | awk -v fields="$fields" -v n="${#C_STATS[@]}" '
		$13 == n && NF == 13 + n {
			k = split(fields, at, " ")
			for (j = 1; j <= k; j++) printf "%s%s", $(at[j]), (j < k ? " " : "\n")
			ok = 1
		} END { exit !ok }' ||
		fail "the status of $name has no statistics: $(dmsetup status "$DM_PREFIX$name")"
}

# c_wait_drained <name> <seconds>: wait until writeback has caught up (dirty tail == key head).
c_wait_drained() {
	wait_drained "$DM_PREFIX$1" "$2" || fail "writeback did not drain in $2 s: status $(dmsetup status "$DM_PREFIX$1")"
}

# c_job <dev> <rw> <offset> <size> <seed>: sets job to the region job of a c_fio region.
c_job() { fio_region_job "c-$2-$5" "$@"; }

# c_fio <write|verify> <dev> <rw> <offset> <size> <seed> [extra fio args]: the data job. "write"
# writes the region and records a checksum of its content; "verify" reads it back, checks it
# against what the same job wrote and compares the checksum. fio's verify alone would pass stale
# data: each block's header holds its offset and a checksum of itself, not which write it came
# from, so a region that was overwritten and came back old would look fine.
c_fio() {
	local mode=$1 dev=$2 region="$3 $4 $5 $6" what="$1 $3 at $4+$5 on $2" job
	c_job "$dev" "$3" "$4" "$5" "$6"
	shift 6
	if [ "$mode" = write ]; then job+=(--do_verify=0); else job+=(--verify_only=1); fi
	c_fio_run "$what" "${job[@]}" "$@"
	if [ "$mode" = write ]; then c_sum_record "$dev" "$region"; else c_sum_check "$dev" "$region"; fi
}

# c_sum_record <dev> <region>: remember the content of a region ("<rw> <offset> <size> <seed>")
# just written; c_sum_check <dev> <region>: the region holds that content.
c_sum_record() {
	local off size
	read -r _ off size _ <<<"$2"
	echo "$2 $(region_sum "$1" "$off" "$size")" >>"$T_TMP/region-sums"
}
c_sum_check() {
	local off size want
	read -r _ off size _ <<<"$2"
	want=$(awk -v k="$2" '$1 " " $2 " " $3 " " $4 == k { s = $5 " " $6 } END { print s }' \
		"$T_TMP/region-sums" 2>/dev/null)
	[ -n "$want" ] || fail "no checksum recorded for the region $2"
	expect_eq "content of the region $2 on $1 (fio's verify passed)" "$want" "$(region_sum "$1" "$off" "$size")"
}

# c_fio_verify_all <dev> <region>...: c_fio verify of every region ("<rw> <offset> <size> <seed>")
# in one fio run, one job per region: a fio start costs seconds under TCG.
c_fio_verify_all() {
	local dev=$1 r all=() job
	shift
	for r in "$@"; do
		# shellcheck disable=SC2086 # r is "<rw> <offset> <size> <seed>"
		c_job "$dev" $r
		all+=("${job[@]}" --verify_only=1)
	done
	c_fio_run "verify of $# regions on $dev" "${all[@]}"
	for r in "$@"; do c_sum_check "$dev" "$r"; done
}

# c_fio_run <what> <fio args...>: run fio, fail on any error, log the throughput.
c_fio_run() {
	local what=$1
	shift
	fio "$@" --output-format=terse --terse-version=3 >"$T_TMP/fio.terse" 2>"$T_TMP/fio.err" ||
		fail "fio $what failed: $(tail -n 3 "$T_TMP/fio.err") $(tail -c 300 "$T_TMP/fio.terse")"
	# terse v3 (lines starting "3;", one per job; fio may print warnings before them): field 5 is
	# the error code; 7 read KiB/s; 48 write KiB/s.
	grep '^3;' "$T_TMP/fio.terse" >"$T_TMP/fio.line" || fail "no terse line from fio: $(head -c 300 "$T_TMP/fio.terse")"
	mv "$T_TMP/fio.line" "$T_TMP/fio.terse"
	expect_eq "fio $what: jobs with an error" 0 "$(cut -d';' -f5 "$T_TMP/fio.terse" | grep -cv '^0$')"
	# Throughput goes to the run's results too: the same jobs run on pcache_rs and on C pcache.
	echo "fio $what ($(c_target_of "${what##* on }")):" \
		"$(awk -F';' '{ r += $7; w += $48 } END { print "read " r " KiB/s, write " w " KiB/s" }' "$T_TMP/fio.terse")" |
		tee -a "${RESULTS_DIR:-$T_TMP}/cache-fio.txt"
}

# The device-mapper target under a device path (or "raw" for a plain block device).
c_target_of() {
	local n=${1#/dev/mapper/}
	[ "$n" != "$1" ] || { echo raw; return; }
	dmsetup table "$n" 2>/dev/null | awk '{ print $3; exit }'
}

# Bytes of a size written as <n>M or <n>G.
c_bytes() {
	case "$1" in
	*M) echo $((${1%M} << 20)) ;;
	*G) echo $((${1%G} << 30)) ;;
	*) echo "$1" ;;
	esac
}

# c_wait_moved <name> <field> <old value> <seconds>: wait until a status field changes.
c_wait_moved() {
	local i
	for ((i = 0; i < $4; i++)); do
		[ "$(c_status "$1" "$2")" != "$3" ] && return 0
		sleep 1
	done
	fail "$2 still at $3 after $4 s: status $(dmsetup status "$DM_PREFIX$1")"
}

