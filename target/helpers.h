/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Out-of-line wrappers for the static inline functions and macros that dm-pcache-rs needs and
 * bindgen cannot see. Each is a one-line forward to the kernel's own definition, except
 * pcache_rs_memcpy_flushcache_crc32c (a data-CRC write's copy, see helpers.c).
 */
#ifndef _DM_PCACHE_RS_HELPERS_H
#define _DM_PCACHE_RS_HELPERS_H

#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/dax.h>
#include <linux/percpu.h>
#include <linux/workqueue.h>

void pcache_rs_bio_set_dev(struct bio *bio, struct block_device *bdev);
u64 pcache_rs_bdev_nr_bytes(struct block_device *bdev);
int pcache_rs_bdev_zeroout(struct block_device *bdev, u64 off, u64 len);
unsigned int pcache_rs_bdev_max_discard_sectors(struct block_device *bdev);
bool pcache_rs_bdev_is_same(struct block_device *a, struct block_device *b);
void *pcache_rs_vmalloc_array(size_t n, size_t size);
bool pcache_rs_pfn_valid(unsigned long pfn);
struct page *pcache_rs_pfn_to_page(unsigned long pfn);
void *pcache_rs_vmap(struct page **pages, unsigned int count);
void pcache_rs_memcpy_flushcache(void *dst, const void *src, size_t cnt);
/* Stores @src at @dst and CRCs it in one pass; false where it cannot (see helpers.c). */
bool pcache_rs_memcpy_flushcache_crc32c(void *dst, const void *src, size_t len, u32 *crc);
unsigned long pcache_rs_copy_mc_to_kernel(void *dst, const void *src, unsigned int cnt);
void pcache_rs_pmem_wmb(void);
void pcache_rs_preempt_disable(void);
void pcache_rs_preempt_enable(void);
void pcache_rs_cond_resched(void);
unsigned int pcache_rs_bio_op(const struct bio *bio);
bool pcache_rs_op_is_write(unsigned int op);
unsigned int pcache_rs_bio_max_sectors(struct block_device *bdev);
void pcache_rs_limits_set_stable_writes(struct queue_limits *lim);
void pcache_rs_limits_set_nowait(struct queue_limits *lim);

/* Work items on the target's own workqueue. */
struct workqueue_struct *pcache_rs_alloc_workqueue(const char *name);
void pcache_rs_init_work(struct work_struct *work, work_func_t fn);
void pcache_rs_init_delayed_work(struct delayed_work *dwork, work_func_t fn);
bool pcache_rs_queue_work(struct workqueue_struct *wq, struct work_struct *work);
bool pcache_rs_queue_delayed_work(struct workqueue_struct *wq, struct delayed_work *dwork,
				  unsigned int msecs);

/* Bios the target holds between map and completion. */
void pcache_rs_bio_list_init(struct bio_list *bl);
void pcache_rs_bio_list_add(struct bio_list *bl, struct bio *bio);
struct bio *pcache_rs_bio_list_pop(struct bio_list *bl);
/*
 * Calls @fn(@ctx, piece, piece_len) on bytes @skip..@skip + @len of @bio's data, page by
 * page (each mapped with kmap_local for the call); stops at the first non-zero return, which
 * it returns. -EINVAL if the range is not all in the bio.
 */
typedef int (*pcache_rs_piece_fn)(void *ctx, void *piece, size_t len);
int pcache_rs_bio_for_each_piece(struct bio *bio, unsigned int skip, unsigned int len,
				 pcache_rs_piece_fn fn, void *ctx);
void pcache_rs_bio_endio(struct bio *bio, int err);
void pcache_rs_bio_submit(struct bio *bio);
int pcache_rs_sync_io(struct block_device *bdev, bool write, bool preflush, bool fua,
		      sector_t sector, void *buf, size_t len);
unsigned int pcache_rs_cpu_id(void);
/* One more than the highest CPU id there can be (nr_cpu_ids). */
unsigned int pcache_rs_nr_cpu_ids(void);

/*
 * Read misses and writes through in flight: for each gap of a bio, a bio to the backing device
 * over pages of its own when the gap's data is to be cached and such pages can be had without
 * waiting, a clone of the bio trimmed to the gap otherwise. A completed one goes on a lock-free
 * list and the queue's work item hands the list to @fill(@ctx) in process context, which
 * delivers a read's data to its bio, fills the cache from the pages of its own, and ends the
 * bio after its last gap.
 */
struct pcache_rs_miss;
struct pcache_rs_missq;

/* The per-bio data a target with misses in flight asks for. */
unsigned int pcache_rs_io_size(void);
struct pcache_rs_missq *pcache_rs_missq_create(struct workqueue_struct *wq);
void pcache_rs_missq_bind(struct pcache_rs_missq *q, void (*fill)(void *ctx), void *ctx);
void pcache_rs_missq_destroy(struct pcache_rs_missq *q);
void pcache_rs_miss_submit(struct pcache_rs_missq *q, struct bio *orig,
			   struct block_device *bdev, u64 off, u32 at, u32 len, u32 tag, bool fills);
struct pcache_rs_miss *pcache_rs_missq_take(struct pcache_rs_missq *q);
struct pcache_rs_miss *pcache_rs_miss_next(struct pcache_rs_miss *m);
/* The gap @m was for, and the read bio it belongs to. */
struct bio *pcache_rs_miss_info(struct pcache_rs_miss *m, u64 *off, u32 *at, u32 *len, u32 *tag);
int pcache_rs_miss_error(struct pcache_rs_miss *m);
/* Whether @m's data is in pages of its own (else it went straight to or from the bio's). */
bool pcache_rs_miss_own(struct pcache_rs_miss *m);
/* Copies a completed read's own pages to its bio; nothing for a write or a clone. */
void pcache_rs_miss_deliver(struct pcache_rs_miss *m);
/* pcache_rs_bio_for_each_piece over @m's own pages, byte 0 the gap's first. */
int pcache_rs_miss_for_each_piece(struct pcache_rs_miss *m, unsigned int skip, unsigned int len,
				  pcache_rs_piece_fn fn, void *ctx);
void pcache_rs_miss_put(struct pcache_rs_miss *m);
void pcache_rs_io_start(struct bio *bio, unsigned int n);
bool pcache_rs_io_put(struct bio *bio, int err, int *error);
/* How far map got with a write it hands to the worker (set before the worker sees it). */
void pcache_rs_io_set_resume(struct bio *bio, u64 done, u64 persist, bool hit);
void pcache_rs_io_get_resume(struct bio *bio, u64 *done, u64 *persist, bool *hit);

/*
 * Per-CPU event counters: @n u64s per CPU. The handle is the per-CPU pointer as a plain
 * pointer (bindgen drops functions whose types carry the per-CPU address space).
 */
void *pcache_rs_counters_alloc(unsigned int n);
void pcache_rs_counters_free(void *c);
void pcache_rs_counter_add(void *c, unsigned int i, u64 v);
u64 pcache_rs_counter_sum(void *c, unsigned int i);
void pcache_rs_counters_zero(void *c, unsigned int n);

/*
 * A spinlock for each subtree of the key index, all of one lockdep class (no two are ever held
 * at once). NULL if the allocation fails.
 */
void *pcache_rs_subtree_locks_alloc(unsigned int n);
void pcache_rs_subtree_locks_free(void *locks);
void pcache_rs_subtree_lock(void *locks, unsigned int i);
void pcache_rs_subtree_unlock(void *locks, unsigned int i);

/* One write of a batch: @len bytes of @buf (kmalloc or vmalloc memory) at @sector. */
struct pcache_rs_write {
	u64 sector;
	const void *buf;
	size_t len;
};

int pcache_rs_write_batch(struct block_device *bdev, const struct pcache_rs_write *writes,
			  unsigned int n);

#endif
