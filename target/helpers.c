// SPDX-License-Identifier: GPL-2.0
/*
 * Out-of-line wrappers for static inline kernel functions used by dm-pcache-rs (see helpers.h).
 */
#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/dax.h>
#include <linux/libnvdimm.h>
#include <linux/mm.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

#include "helpers.h"

void pcache_rs_bio_set_dev(struct bio *bio, struct block_device *bdev)
{
	bio_set_dev(bio, bdev);
}

u64 pcache_rs_bdev_nr_bytes(struct block_device *bdev)
{
	return bdev_nr_bytes(bdev);
}

bool pcache_rs_bdev_is_same(struct block_device *a, struct block_device *b)
{
	return a->bd_dev == b->bd_dev;
}

void *pcache_rs_vmalloc_array(size_t n, size_t size)
{
	return vmalloc_array(n, size);
}

bool pcache_rs_pfn_valid(unsigned long pfn)
{
	return pfn_valid(pfn);
}

struct page *pcache_rs_pfn_to_page(unsigned long pfn)
{
	return pfn_to_page(pfn);
}

void *pcache_rs_vmap(struct page **pages, unsigned int count)
{
	return vmap(pages, count, VM_MAP, PAGE_KERNEL);
}

void pcache_rs_memcpy_flushcache(void *dst, const void *src, size_t cnt)
{
	memcpy_flushcache(dst, src, cnt);
}

unsigned long pcache_rs_copy_mc_to_kernel(void *dst, const void *src, unsigned int cnt)
{
	return copy_mc_to_kernel(dst, src, cnt);
}

void pcache_rs_pmem_wmb(void)
{
	pmem_wmb();
}

void pcache_rs_cond_resched(void)
{
	cond_resched();
}

unsigned int pcache_rs_bio_op(const struct bio *bio)
{
	return bio_op(bio);
}

bool pcache_rs_op_is_write(unsigned int op)
{
	return op_is_write(op);
}

unsigned int pcache_rs_bio_max_sectors(struct block_device *bdev)
{
	return queue_max_sectors(bdev_get_queue(bdev));
}
