#!/usr/bin/env bash
# Guest half of tests/powercut: one boot of the power-cut test. Runs inside qemu/run-vm.
#
#   tests/vm/powercut-guest.sh <state file> <boot number> <last: 0|1> [<module .ko>]
#
# The state file lives in the repository (the host sees it after the guest dies); it records which
# writes became durable (an fsync on the device, i.e. a FLUSH, completed after them) and which were
# still pending when power went. Each boot:
#   1. creates the cache device (boot 0 formats a zeroed cache, later boots replay it);
#   2. verifies every region whose last write was durable (fio verify_only: crc32c + offset in every
#      block), and checks the kernel log for splats;
#   3. unless it is the last boot, writes more steps (some followed by fsync, some not; regions are
#      rewritten across boots so replay must pick the newest data), then cuts power with
#      `echo b > /proc/sysrq-trigger` (QEMU runs with -no-reboot, so it exits) at a point that
#      depends on the boot number: during a write with no flush since, right after a completed
#      fsync, or with unflushed writes behind the last fsync.
#   The last boot also drains writeback and verifies the backing device alone.
set -uo pipefail
state=$1
boot=$2
last=$3
ko=${4:-$PCACHE_KO}

SPLAT_RE='WARNING:|BUG:|KASAN|possible circular locking|lockdep|Oops|Call Trace|general protection|UBSAN|kernel BUG'
REGIONS=24           # regions of the device the test writes, REGION_MIB each
REGION_MIB=8
STEPS=6              # write steps per boot
CACHE_MIB=512        # the cache: a dm-linear slice of the pmem (upstream minimum size)
name=pcut
dev=/dev/mapper/$name

say() { echo "powercut(boot $boot): $*"; }
die() {
	say "FAIL: $*"
	echo "fail $boot $*" >>"$state"
	dmesg | tail -n 40 | sed 's/^/    dmesg| /'
	exit 1
}
record() { echo "$*" >>"$state" && sync; }
dms() { dmsetup --noudevsync "$@"; }

# pc_fio <write|verify> <region> <rw> <seed> [fio args]: one region's data job (numjobs 2, each job
# on half the region, bs 4k..1M, crc32c verify headers).
pc_fio() {
	local mode=$1 r=$2 rw=$3 seed=$4 half=$((REGION_MIB << 19))
	shift 4
	local args=(--name="r$r" --filename="$dev" --direct=1 --ioengine=libaio --iodepth=8 --rw="$rw"
		--bsrange=4k-1m --blockalign=4k --numjobs=2 --offset=$((r * REGION_MIB))M --size="$half"
		--offset_increment="$half" --randseed="$seed" --verify=crc32c --verify_fatal=1
		--group_reporting --output-format=terse --terse-version=3)
	if [ "$mode" = write ]; then args+=(--do_verify=0); else args+=(--verify_only=1); fi
	fio "${args[@]}" "$@" >/tmp/pc-fio.out 2>&1
}

# Only what the kernel logged after this script started counts (boot messages mention lockdep).
log_base=$(dmesg | wc -l)
splat_check() {
	local s
	s=$(dmesg | tail -n +"$((log_base + 1))" | grep -E "$SPLAT_RE" | head -n 3)
	[ -z "$s" ] || die "kernel splat: $s"
}

# Process substitution needs /dev/fd, which the minimal guest init does not create.
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -d /sys/module/dm_pcache_rs ] || insmod "$ko" || die "insmod $ko failed"
if [ "$boot" = 0 ]; then
	dd if=/dev/zero of="$PMEM_DEV" bs=1M count=64 oflag=direct status=none
	: >"$state"
fi
dms create "${name}_pm" --table "0 $((CACHE_MIB * 2048)) linear $PMEM_DEV 0" || die "slice"
table="0 $(blockdev --getsz "$BACKING_DEV") pcache_rs /dev/mapper/${name}_pm $BACKING_DEV"
t0=$SECONDS
dms create "$name" --table "$table" || die "create after the cut failed: $(dmesg | grep pcache_rs | tail -n 3)"
say "attached in $((SECONDS - t0)) s: $(dmsetup status "$name")"
[ "$boot" = 0 ] && { dms message "$name" 0 gc_percent 10 || die "gc_percent"; }

# Regions whose last record is "durable": "<region> <rw> <seed>".
durable() {
	awk '$1 == "durable" { d[$2] = $3 " " $4 } $1 == "pending" { delete d[$2] }
		END { for (r in d) print r, d[r] }' "$state" | sort -n
}

n=0
t0=$SECONDS
while read -r r rw seed; do
	pc_fio verify "$r" "$rw" "$seed" ||
		die "region $r ($rw seed $seed), durable before the cut, lost: $(grep -m3 -i 'verify\|bad\|err' /tmp/pc-fio.out)"
	n=$((n + 1))
done < <(durable)
[ "$n" = "$(durable | wc -l)" ] || die "verified $n regions of $(durable | wc -l)"
say "verified $n durable regions in $((SECONDS - t0)) s"
record "verified $boot $n"
splat_check

if [ "$last" = 1 ]; then
	# Writeback drains completely, then the backing device alone holds every durable region.
	for _ in $(seq 900); do
		kh=$(dmsetup status "$name" | awk '{ print $10 }')
		dt=$(dmsetup status "$name" | awk '{ print $11 }')
		[ "$kh" = "$dt" ] && break
		sleep 1
	done
	[ "$kh" = "$dt" ] || die "writeback did not drain: $(dmsetup status "$name")"
	dms remove "$name" || die "remove"
	dev=$BACKING_DEV
	n=0
	while read -r r rw seed; do
		pc_fio verify "$r" "$rw" "$seed" || die "region $r not on the backing device after writeback"
		n=$((n + 1))
	done < <(durable)
	[ "$n" = "$(durable | wc -l)" ] || die "verified $n regions of $(durable | wc -l) on the backing device"
	say "backing device holds all durable regions after writeback"
	dms remove "${name}_pm"
	splat_check
	record "final ok"
	exit 0
fi

# Write steps. Odd steps are not flushed; each even step ends with fsync (a FLUSH for the whole
# device), which makes the step before it durable too.
mode=$((boot % 3))
unflushed=()
for step in $(seq 1 "$STEPS"); do
	r=$(((boot * 7 + step * 5) % REGIONS))
	seed=$((boot * 100 + step))
	rw=write
	[ $((step % 3)) = 0 ] || rw=randwrite
	record "pending $r"
	if [ "$step" = "$STEPS" ] && [ "$mode" = 0 ]; then
		# Cut during this write: nothing after the last fsync may be relied on.
		pc_fio write "$r" "$rw" "$seed" --end_fsync=1 &
		sleep $((1 + boot % 4))
		record "cut $boot during-write step $step"
		splat_check
		echo b >/proc/sysrq-trigger
		sleep 60
		die "still alive after sysrq b"
	fi
	if [ $((step % 2)) = 1 ]; then
		pc_fio write "$r" "$rw" "$seed" || die "write step $step: $(tail -n 3 /tmp/pc-fio.out)"
		unflushed+=("$r $rw $seed")
	else
		pc_fio write "$r" "$rw" "$seed" --end_fsync=1 || die "write step $step: $(tail -n 3 /tmp/pc-fio.out)"
		for u in "${unflushed[@]}" "$r $rw $seed"; do record "durable $u"; done
		unflushed=()
	fi
done
if [ "$mode" = 1 ]; then
	# Cut right after a completed fsync, with the writeback and GC tick running.
	record "cut $boot after-fsync"
else
	# Cut with a completed but unflushed write after the last fsync.
	r=$(((boot * 7 + 3) % REGIONS))
	record "pending $r"
	pc_fio write "$r" randwrite $((boot * 100 + 99)) || die "unflushed write: $(tail -n 3 /tmp/pc-fio.out)"
	record "cut $boot unflushed-write"
fi
splat_check
echo b >/proc/sysrq-trigger
sleep 60
die "still alive after sysrq b"
