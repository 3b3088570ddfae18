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
