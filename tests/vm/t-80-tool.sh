# pcache-rs, the offline tool, on a cache the module wrote: check finds it clean (data CRCs
# included), and writeback alone gets every dirty byte to the backing device.
# shellcheck shell=bash

# The tool as tests/run builds it (cargo test --release builds the binary); a plain cargo build
# puts it under build/cargo too when CARGO_TARGET_DIR is unset.
# Prints nothing if it is not built: the caller skips (a skip inside $(...) would end only the
# subshell).
t_tool() {
	local b
	for b in "${PCACHE_TOOL:-}" "$REPO_ROOT_DIR/build/cargo/release/pcache-rs" \
		"$REPO_ROOT_DIR/build/cargo/debug/pcache-rs"; do
		[ -n "$b" ] && [ -x "$b" ] && { echo "$b"; return; }
	done
	# None built: empty, so that the tests skip (a failing status would fail them).
	return 0
}

# The backing device is a dm-linear swapped for dm-error while the data is written, so all of it
# stays dirty in the cache; the cache is removed; the tool then writes it back to the real backing
# device, which must hold every region (fio's verify and the content checksum).
test_tool_check_and_writeback_after_remove() {
	local tool back=${DM_PREFIX}tb_back cache dev sz out
	[ "$TARGET" = pcache_rs ] || skip "runs on our module's cache"
	tool=$(t_tool)
	[ -n "$tool" ] || skip "pcache-rs is not built (cargo build --release)"
	ensure_module
	wipe_cache
	sz=$(sectors "$BACKING_DEV")
	dms create "$back" --table "0 $sz error"
	cache=$(c_slice tb_pm "$C_CACHE_MIB")
	create tb "0 $sz $TARGET $cache /dev/mapper/$back 2 data_crc true"
	dev=/dev/mapper/${DM_PREFIX}tb
	c_fio write "$dev" randwrite 0 32M 81
	c_fio write "$dev" write 512M 16M 82
	[ "$(c_status tb dirty_tail)" != "$(c_status tb key_head)" ] ||
		fail "nothing is dirty although the backing device failed every write"
	dms remove "${DM_PREFIX}tb"
	dms remove "$back"
	out=$("$tool" check --data --backing "$BACKING_DEV" "$cache") ||
		fail "pcache-rs check --data: exit $?: $out"
	echo "$out"
	"$tool" writeback --backing "$BACKING_DEV" "$cache" || fail "pcache-rs writeback: exit $?"
	# Idempotent: a second run finds nothing to do and changes nothing.
	"$tool" writeback --backing "$BACKING_DEV" "$cache" || fail "second pcache-rs writeback: exit $?"
	c_fio_verify_all "$BACKING_DEV" "randwrite 0 32M 81" "write 512M 16M 82"
	"$tool" --json show "$cache" >"$T_TMP/show.json" || fail "pcache-rs show: exit $?"
	expect_eq "dirty tail at the key head after the tool's writeback (show --json)" clean \
		"$(python3 -c 'import json, sys; d = json.load(sys.stdin); print("clean" if d["dirty_tail"]["pos"] == d["key_head"] else "dirty")' <"$T_TMP/show.json")"
}
