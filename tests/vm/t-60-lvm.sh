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
