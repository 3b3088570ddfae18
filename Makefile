# SPDX-License-Identifier: GPL-2.0
#
# Out-of-tree build of dm-pcache-rs.ko.
#   make KDIR=/path/to/kernel/build          build the module
#   make KDIR=... CLIPPY=1                   build with clippy
#   make KDIR=... clean
# Without KDIR, the test kernel built by qemu/build-kernel is used (it is built if needed).

KDIR ?= $(shell $(CURDIR)/qemu/build-kernel test)
LLVM ?= -19

all modules:
	$(MAKE) -C $(KDIR) M=$(CURDIR) LLVM=$(LLVM) modules

clean:
	$(MAKE) -C $(KDIR) M=$(CURDIR) LLVM=$(LLVM) clean
	rm -f target/bindings_generated.rs

rustfmt:
	rustfmt --edition 2021 --config-path $(KDIR)/source/.rustfmt.toml dm_pcache.rs

.PHONY: all modules clean rustfmt
