# LVM and the cache: logical volumes on top of a pcache device keep their data across deactivation
# and device remove/create, and a pcache device whose backing device is an LVM logical volume works,
# survives remove/create and drains to the LV.
# shellcheck shell=bash
# Uses c_new/c_slice/c_table/c_fio/c_wait_drained from t-40-cache.sh (same suite, same boot).
# VG names start with the test prefix, so the framework's cleanup removes leftover LVs.

# lvm without udev (not running in the guest), with a filter that admits only the given devices.
l_lvm() { # <accepted device regex> <lvm command and args...>
	local accept=$1
	shift
	mkdir -p /run/lock/lvm /run/lvm
	lvm "$@" --config "devices { filter=[ \"a|^($accept)\$|\", \"r|.*|\" ] \
		global_filter=[ \"a|^($accept)\$|\", \"r|.*|\" ] use_devicesfile=0 hints=\"none\" \
		obtain_device_list_from_udev=0 } \
		activation { udev_sync=0 udev_rules=0 monitoring=0 } backup { backup=0 archive=0 }"
}

test_cache_lvm_on_top() {
	local dev tbl acc lv
	dev=$(c_new lt)
	tbl=$(dmsetup table "${DM_PREFIX}lt")
	acc=$dev
	l_lvm "$acc" pvcreate -y -ff "$dev"
	l_lvm "$acc" vgcreate "${DM_PREFIX}vgt" "$dev"
	l_lvm "$acc" lvcreate -y -W n -Z n -L 192M -n lv1 "${DM_PREFIX}vgt"
	l_lvm "$acc" lvcreate -y -W n -Z n -L 192M -n lv2 "${DM_PREFIX}vgt"
	for lv in lv1 lv2; do
		[ -b "/dev/mapper/${DM_PREFIX}vgt-$lv" ] || fail "no device node for LV $lv"
	done
	c_fio write "/dev/mapper/${DM_PREFIX}vgt-lv1" randwrite 0 128M 71
	c_fio write "/dev/mapper/${DM_PREFIX}vgt-lv2" write 64M 128M 72
	# Deactivate, remove the cache with its dirty data, create it again, activate: all there.
	l_lvm "$acc" vgchange -an "${DM_PREFIX}vgt"
	dms remove "${DM_PREFIX}lt"
	create lt "$tbl"
	l_lvm "$acc" pvscan
	l_lvm "$acc" vgchange -ay "${DM_PREFIX}vgt"
	l_lvm "$acc" lvs "${DM_PREFIX}vgt"
	c_fio verify "/dev/mapper/${DM_PREFIX}vgt-lv1" randwrite 0 128M 71
	c_fio verify "/dev/mapper/${DM_PREFIX}vgt-lv2" write 64M 128M 72
	l_lvm "$acc" vgchange -an "${DM_PREFIX}vgt"
	l_lvm "$acc" vgremove -y "${DM_PREFIX}vgt"
	l_lvm "$acc" pvremove -y "$dev"
}

test_cache_lvm_below() {
	ensure_module
	wipe_cache
	local acc=$BACKING_DEV lv pm tbl
	dd if=/dev/zero of="$BACKING_DEV" bs=1M count=4 oflag=direct status=none
	l_lvm "$acc" pvcreate -y -ff "$BACKING_DEV"
	l_lvm "$acc" vgcreate "${DM_PREFIX}vgb" "$BACKING_DEV"
	l_lvm "$acc" lvcreate -y -W n -Z n -L 1G -n back "${DM_PREFIX}vgb"
	lv=/dev/mapper/${DM_PREFIX}vgb-back
	[ -b "$lv" ] || fail "no device node for the LV"
	pm=$(c_slice lb_pm "$C_CACHE_MIB")
	tbl="0 $(sectors "$lv") $TARGET $pm $lv"
	create lb "$tbl"
	expect_eq "device size" "$(sectors "$lv")" "$(sectors "/dev/mapper/${DM_PREFIX}lb")"
	c_fio write "/dev/mapper/${DM_PREFIX}lb" randwrite 0 96M 81
	c_fio write "/dev/mapper/${DM_PREFIX}lb" write 896M 96M 82
	dms remove "${DM_PREFIX}lb"
	create lb "$tbl"
	c_fio verify "/dev/mapper/${DM_PREFIX}lb" randwrite 0 96M 81
	c_wait_drained lb 600
	dms remove "${DM_PREFIX}lb"
	# The LV alone holds the data.
	c_fio verify "$lv" randwrite 0 96M 81
	c_fio verify "$lv" write 896M 96M 82
	l_lvm "$acc" vgchange -an "${DM_PREFIX}vgb"
	l_lvm "$acc" vgremove -y "${DM_PREFIX}vgb"
	l_lvm "$acc" pvremove -y "$BACKING_DEV"
}

# A filesystem on pcache_rs over an LV, in use while LVM changes the LV's table below the cache
# (lvextend, lvchange --refresh: each a load, suspend and resume of the LV) and the cache's own
# table is reloaded in the same order with the new length; then the filesystem grows (resize2fs,
# unmounted: the guest has no mount table for its online path) into the new space, and every file
# verifies after remove and create.
test_cache_lvm_extend_below_with_fs() {
	ensure_module
	wipe_cache
	local acc=$BACKING_DEV lv pm tbl dev mnt pid out
	dd if=/dev/zero of="$BACKING_DEV" bs=1M count=4 oflag=direct status=none
	l_lvm "$acc" pvcreate -y -ff "$BACKING_DEV"
	l_lvm "$acc" vgcreate "${DM_PREFIX}vge" "$BACKING_DEV"
	l_lvm "$acc" lvcreate -y -W n -Z n -L 256M -n back "${DM_PREFIX}vge"
	lv=/dev/mapper/${DM_PREFIX}vge-back
	pm=$(c_slice le_pm "$C_CACHE_MIB")
	create le "0 $(sectors "$lv") $TARGET $pm $lv"
	dev=/dev/mapper/${DM_PREFIX}le
	mkfs.ext4 -q -F "$dev" >/dev/null
	mnt=$(mktemp -d -p "$T_TMP")
	mount -t ext4 "$dev" "$mnt"
	fio --name=lvfs --directory="$mnt" --nrfiles=4 --filesize=16M --rw=randwrite --bs=4k \
		--ioengine=psync --fsync=32 --verify=crc32c --verify_fatal=1 --runtime=20 --time_based=0 \
		--randseed=7 >"$T_TMP/lvfs.out" 2>&1 &
	pid=$!
	l_lvm "$acc" lvextend -y -L +128M "${DM_PREFIX}vge/back"
	l_lvm "$acc" lvchange -y --refresh "${DM_PREFIX}vge/back"
	tbl="0 $(sectors "$lv") $TARGET $pm $lv"
	dms load "${DM_PREFIX}le" --table "$tbl"
	dms suspend "${DM_PREFIX}le"
	dms resume "${DM_PREFIX}le"
	wait "$pid" || fail "fio on the filesystem failed across the reloads: $(tail -n 5 "$T_TMP/lvfs.out")"
	expect_eq "cache device size after lvextend and reload" "$(sectors "$lv")" "$(sectors "$dev")"
	umount "$mnt"
	fsck.ext4 -fn "$dev" || fail "fsck.ext4 found errors after the reloads"
	# -f: the read-only fsck above found it clean, but records no check time.
	out=$(resize2fs -f "$dev" 2>&1) || fail "resize2fs failed: $out"
	mount -t ext4 "$dev" "$mnt"
	# More than the filesystem had free before it grew (256 MiB, 64 MiB of them fio files).
	head -c 250M /dev/urandom >"$mnt/big"
	sync
	(cd "$mnt" && sha256sum big lvfs.* >"$T_TMP/lv.sums")
	umount "$mnt"
	dms remove "${DM_PREFIX}le"
	create le "$tbl"
	fsck.ext4 -fn "$dev" || fail "fsck.ext4 found errors after the reloads"
	mount -t ext4 "$dev" "$mnt"
	(cd "$mnt" && sha256sum -c --quiet "$T_TMP/lv.sums") || fail "files changed across the reloads"
	umount "$mnt"
	dms remove "${DM_PREFIX}le"
	l_lvm "$acc" vgchange -an "${DM_PREFIX}vge"
	l_lvm "$acc" vgremove -y "${DM_PREFIX}vge"
	l_lvm "$acc" pvremove -y "$BACKING_DEV"
}
