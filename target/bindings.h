/* SPDX-License-Identifier: GPL-2.0 */
/* Input to bindgen for target/bindings_generated.rs (see Kbuild). */
#include <linux/device-mapper.h>
#include <linux/dax.h>
#include <linux/vmalloc.h>
#include <linux/blkdev.h>
#include <linux/bio.h>
#include <linux/crc32.h>

#include "helpers.h"

/* Macros with casts that bindgen cannot evaluate, as typed constants. */
const blk_mode_t PCACHE_RS_BLK_OPEN_RW = BLK_OPEN_READ | BLK_OPEN_WRITE;
const unsigned int PCACHE_RS_PAGE_SHIFT = PAGE_SHIFT;
const unsigned int PCACHE_RS_REQ_OP_READ = REQ_OP_READ;
const unsigned int PCACHE_RS_REQ_OP_WRITE = REQ_OP_WRITE;
const unsigned int PCACHE_RS_REQ_OP_FLUSH = REQ_OP_FLUSH;
const unsigned int PCACHE_RS_REQ_OP_DISCARD = REQ_OP_DISCARD;
const unsigned int PCACHE_RS_REQ_OP_WRITE_ZEROES = REQ_OP_WRITE_ZEROES;
const blk_opf_t PCACHE_RS_REQ_PREFLUSH = REQ_PREFLUSH;
const blk_opf_t PCACHE_RS_REQ_FUA = REQ_FUA;
const blk_opf_t PCACHE_RS_REQ_NOWAIT = REQ_NOWAIT;
const unsigned long PCACHE_RS_DAX_ACCESS = DAX_ACCESS;
