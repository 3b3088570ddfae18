# Module life cycle: load, register the target type, refuse to unload while in use, unload.
# shellcheck shell=bash

test_module_load_unload() {
	if [ -d "/sys/module/$MODULE_NAME" ]; then rmmod "$MODULE_NAME"; fi
	[ -f "$MODULE_KO" ] || fail "module $MODULE_KO is not built"
	for round in 1 2 3; do
		insmod "$MODULE_KO"
		[ -d "/sys/module/$MODULE_NAME" ] || fail "round $round: /sys/module/$MODULE_NAME missing after insmod"
		rmmod "$MODULE_NAME"
		[ ! -d "/sys/module/$MODULE_NAME" ] || fail "round $round: still loaded after rmmod"
		if dmsetup targets | awk '{ print $1 }' | grep -qx "$TARGET"; then
			fail "round $round: target $TARGET still registered after rmmod"
		fi
	done
	insmod "$MODULE_KO"
}

test_targets_lists_target() {
	ensure_module
	dmsetup targets
	dmsetup targets | awk '{ print $1 }' | grep -qx "$TARGET" || fail "dmsetup targets does not list $TARGET"
	# The version is printed as vX.Y.Z.
	expect_match "version of $TARGET" '^v[0-9]+\.[0-9]+\.[0-9]+$' \
		"$(dmsetup targets | awk -v t="$TARGET" '$1 == t { print $2 }')"
}

test_unload_refused_while_in_use() {
	ensure_module
	wipe_cache
	create dev "$(table)"
	if rmmod "$MODULE_NAME" 2>/dev/null; then
		fail "rmmod succeeded while a $TARGET device existed"
	fi
	dms remove "${DM_PREFIX}dev"
	rmmod "$MODULE_NAME"
	insmod "$MODULE_KO"
}

# The guest behaves like a normal shell: process substitution and /dev/std* work (the minimal
# init has no udev to make /dev/fd).
test_guest_shell_has_dev_fd() {
	cmp <(echo same) <(echo same) || fail "process substitution does not work"
	echo ok >/dev/stderr || fail "/dev/stderr is not writable"
	expect_eq "read through /dev/stdin" ok "$(echo ok | cat /dev/stdin)"
}
