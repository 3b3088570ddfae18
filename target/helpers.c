// SPDX-License-Identifier: GPL-2.0
/*
 * Out-of-line wrappers for static inline kernel functions used by dm-pcache-rs (see helpers.h).
 */
#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/dax.h>
#include <linux/delay.h>
#include <linux/device-mapper.h>
#include <linux/highmem.h>
#include <linux/libnvdimm.h>
#include <linux/llist.h>
#include <linux/mm.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>
#ifdef CONFIG_X86_64
#include <asm/cpufeature.h>
#endif

#include "helpers.h"

void pcache_rs_bio_set_dev(struct bio *bio, struct block_device *bdev)
{
	bio_set_dev(bio, bdev);
}

u64 pcache_rs_bdev_nr_bytes(struct block_device *bdev)
{
	return bdev_nr_bytes(bdev);
}

/*
 * Zeroes @len bytes at @off (sector aligned) and waits: with the device's write-zeroes if it has
 * one, else by writing zero pages.
 */
int pcache_rs_bdev_zeroout(struct block_device *bdev, u64 off, u64 len)
{
	return blkdev_issue_zeroout(bdev, off >> SECTOR_SHIFT, len >> SECTOR_SHIFT, GFP_NOIO, 0);
}

unsigned int pcache_rs_bdev_max_discard_sectors(struct block_device *bdev)
{
	return bdev_max_discard_sectors(bdev);
}

void pcache_rs_bio_submit(struct bio *bio)
{
	/* Sent from a context that may wait: see pcache_rs_miss_submit. */
	bio->bi_opf &= ~REQ_NOWAIT;
	submit_bio_noacct(bio);
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

/*
 * The one helper that is not a forward: a data-CRC write must store and CRC the same bytes, and
 * the source is a bio's page, which its owner may rewrite during an O_DIRECT write. This loop
 * loads each 8-byte word of @src once, stores that word to @dst with a non-temporal store (as
 * memcpy_flushcache does for aligned words; ordered by the caller's pmem_wmb) and feeds it to
 * the CRC32 instruction, so no staging copy is needed. The CRC continues from *@crc with no
 * inversion, exactly as crc32c() computes it. Returns false, having touched nothing, where it
 * cannot: not x86-64, no SSE4.2, or @dst, @src or @len not a multiple of 8.
 */
bool pcache_rs_memcpy_flushcache_crc32c(void *dst, const void *src, size_t len, u32 *crc)
{
#ifdef CONFIG_X86_64
	u64 *d = dst;
	const u64 *s = src;
	u32 c = *crc;

	if (!boot_cpu_has(X86_FEATURE_XMM4_2) ||
	    (((unsigned long)dst | (unsigned long)src | len) & 7))
		return false;
	for (; len; len -= 8) {
		u64 w = READ_ONCE(*s);

		asm volatile("movnti %1, %0" : "=m"(*d) : "r"(w));
		asm("crc32q %1, %q0" : "+r"(c) : "r"(w));
		s++;
		d++;
	}
	*crc = c;
	return true;
#else
	return false;
#endif
}

unsigned long pcache_rs_copy_mc_to_kernel(void *dst, const void *src, unsigned int cnt)
{
	return copy_mc_to_kernel(dst, src, cnt);
}

void pcache_rs_pmem_wmb(void)
{
	pmem_wmb();
}

void pcache_rs_preempt_disable(void)
{
	preempt_disable();
}

void pcache_rs_preempt_enable(void)
{
	preempt_enable();
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

struct workqueue_struct *pcache_rs_alloc_workqueue(const char *name)
{
	return alloc_workqueue("pcache_rs-%s", WQ_UNBOUND | WQ_MEM_RECLAIM, 0, name);
}

void pcache_rs_init_work(struct work_struct *work, work_func_t fn)
{
	INIT_WORK(work, fn);
}

void pcache_rs_init_delayed_work(struct delayed_work *dwork, work_func_t fn)
{
	INIT_DELAYED_WORK(dwork, fn);
}

bool pcache_rs_queue_work(struct workqueue_struct *wq, struct work_struct *work)
{
	return queue_work(wq, work);
}

bool pcache_rs_queue_delayed_work(struct workqueue_struct *wq, struct delayed_work *dwork,
				  unsigned int msecs)
{
	return queue_delayed_work(wq, dwork, msecs_to_jiffies(msecs));
}

void pcache_rs_bio_list_init(struct bio_list *bl)
{
	bio_list_init(bl);
}

void pcache_rs_bio_list_add(struct bio_list *bl, struct bio *bio)
{
	bio_list_add(bl, bio);
}

struct bio *pcache_rs_bio_list_pop(struct bio_list *bl)
{
	return bio_list_pop(bl);
}

/* Calls @fn on each mapped piece of bytes @skip..@skip + @len of @bio's data at @iter. */
static int pcache_rs_iter_for_each_piece(struct bio *bio, struct bvec_iter iter,
					 unsigned int skip, unsigned int len,
					 pcache_rs_piece_fn fn, void *ctx)
{
	struct bvec_iter it;
	struct bio_vec bv;
	int ret = 0;

	if (skip > iter.bi_size || len > iter.bi_size - skip)
		return -EINVAL;
	bio_advance_iter(bio, &iter, skip);
	iter.bi_size = len;
	__bio_for_each_segment(bv, bio, it, iter) {
		void *p = bvec_kmap_local(&bv);

		ret = fn(ctx, p, bv.bv_len);
		kunmap_local(p);
		if (ret)
			break;
	}
	return ret;
}

int pcache_rs_bio_for_each_piece(struct bio *bio, unsigned int skip, unsigned int len,
				 pcache_rs_piece_fn fn, void *ctx)
{
	return pcache_rs_iter_for_each_piece(bio, bio->bi_iter, skip, len, fn, ctx);
}

void pcache_rs_limits_set_stable_writes(struct queue_limits *lim)
{
	lim->features |= BLK_FEAT_STABLE_WRITES;
}

void pcache_rs_limits_set_nowait(struct queue_limits *lim)
{
	lim->features |= BLK_FEAT_NOWAIT;
}

void pcache_rs_bio_endio(struct bio *bio, int err)
{
	bio->bi_status = errno_to_blk_status(err);
	bio_endio(bio);
}

static struct page *pcache_rs_buf_page(void *addr)
{
	return is_vmalloc_addr(addr) ? vmalloc_to_page(addr) : virt_to_page(addr);
}

/*
 * A bio of @opf at *@sector of @bdev holding as much of *@buf (*@len bytes) as fits; advances
 * all three past what it took.
 */
static struct bio *pcache_rs_bio_fill(struct block_device *bdev, blk_opf_t opf, sector_t *sector,
				      const void **buf, size_t *len)
{
	unsigned int nr_vecs = min_t(size_t, DIV_ROUND_UP(offset_in_page(*buf) + *len, PAGE_SIZE),
				     BIO_MAX_VECS);
	struct bio *bio = bio_alloc(bdev, nr_vecs, opf, GFP_NOIO);

	bio->bi_iter.bi_sector = *sector;
	while (*len) {
		unsigned int off = offset_in_page(*buf);
		unsigned int n = min_t(size_t, PAGE_SIZE - off, *len);

		if (bio_add_page(bio, pcache_rs_buf_page((void *)*buf), n, off) != n)
			break;
		*buf += n;
		*len -= n;
		*sector += n >> SECTOR_SHIFT;
	}
	return bio;
}

/*
 * Synchronous IO of @len bytes of @buf (kmalloc or vmalloc memory) at @sector of @bdev, or an
 * empty flush if @len is 0. Called from the target's workqueue, never from map.
 */
int pcache_rs_sync_io(struct block_device *bdev, bool write, bool preflush, bool fua,
		      sector_t sector, void *buf, size_t len)
{
	blk_opf_t opf = write ? REQ_OP_WRITE : REQ_OP_READ;
	const void *pos = buf;
	struct bio *bio;
	int ret;

	if (preflush)
		opf |= REQ_PREFLUSH;
	if (fua)
		opf |= REQ_FUA;
	opf |= REQ_SYNC;

	while (true) {
		bio = pcache_rs_bio_fill(bdev, opf, &sector, &pos, &len);
		ret = submit_bio_wait(bio);
		bio_put(bio);
		if (ret || !len)
			return ret;
		/* Only the first bio of a split request carries the flush. */
		opf &= ~REQ_PREFLUSH;
	}
}

/* Completion of a batch of writes: the last bio to end wakes the submitter. */
struct pcache_rs_batch {
	atomic_t pending;
	int error;
	struct completion done;
};

static void pcache_rs_batch_put(struct pcache_rs_batch *b)
{
	if (atomic_dec_and_test(&b->pending))
		complete(&b->done);
}

static void pcache_rs_batch_end_io(struct bio *bio)
{
	struct pcache_rs_batch *b = bio->bi_private;

	if (bio->bi_status)
		cmpxchg(&b->error, 0, blk_status_to_errno(bio->bi_status));
	bio_put(bio);
	pcache_rs_batch_put(b);
}

/*
 * Writes @n buffers to @bdev concurrently and waits for all of them; returns the first error.
 * Writeback uses it for the extents of one kset, which never overlap within a batch, so their
 * order does not matter. Like pcache_rs_sync_io, it sleeps and is never called from map.
 */
int pcache_rs_write_batch(struct block_device *bdev, const struct pcache_rs_write *writes,
			  unsigned int n)
{
	struct pcache_rs_batch b;
	struct blk_plug plug;
	unsigned int i;

	/* One reference of the submitter's own, so that completion cannot race the loop. */
	atomic_set(&b.pending, 1);
	b.error = 0;
	init_completion(&b.done);
	blk_start_plug(&plug);
	for (i = 0; i < n; i++) {
		const void *buf = writes[i].buf;
		size_t len = writes[i].len;
		sector_t sector = writes[i].sector;

		while (len) {
			struct bio *bio = pcache_rs_bio_fill(bdev, REQ_OP_WRITE, &sector, &buf, &len);

			bio->bi_private = &b;
			bio->bi_end_io = pcache_rs_batch_end_io;
			atomic_inc(&b.pending);
			submit_bio(bio);
		}
	}
	blk_finish_plug(&plug);
	pcache_rs_batch_put(&b);
	wait_for_completion_io(&b.done);
	return b.error;
}

unsigned int pcache_rs_cpu_id(void)
{
	return raw_smp_processor_id();
}

unsigned int pcache_rs_nr_cpu_ids(void)
{
	return nr_cpu_ids;
}

static u64 __percpu *pcache_rs_counters(void *c)
{
	return (u64 __force __percpu *)c;
}

void *pcache_rs_counters_alloc(unsigned int n)
{
	return (void __force *)__alloc_percpu(n * sizeof(u64), sizeof(u64));
}

void pcache_rs_counters_free(void *c)
{
	free_percpu(pcache_rs_counters(c));
}

void pcache_rs_counter_add(void *c, unsigned int i, u64 v)
{
	this_cpu_add(pcache_rs_counters(c)[i], v);
}

u64 pcache_rs_counter_sum(void *c, unsigned int i)
{
	u64 sum = 0;
	int cpu;

	for_each_possible_cpu(cpu)
		sum += *per_cpu_ptr(&pcache_rs_counters(c)[i], cpu);
	return sum;
}

/* Racing adds on other CPUs may survive the reset: counters are statistics. */
void pcache_rs_counters_zero(void *c, unsigned int n)
{
	unsigned int i;
	int cpu;

	for_each_possible_cpu(cpu)
		for (i = 0; i < n; i++)
			WRITE_ONCE(*per_cpu_ptr(&pcache_rs_counters(c)[i], cpu), 0);
}

struct pcache_rs_miss {
	struct llist_node node;
	struct pcache_rs_missq *q;
	struct bio *orig;
	u64 off;		/* byte offset of the gap on the backing device */
	u32 at;			/* where the gap starts in @orig's data */
	u32 len;
	u32 tag;		/* the gap's placeholder key, 0 for none */
	/*
	 * The clone reads into, or writes from, pages of its own rather than @orig's: what the
	 * backing device returned or took, which the owner of @orig's pages cannot change.
	 */
	bool own;
	/* must be last: allocated from the queue's bio_set with this struct as front pad */
	struct bio clone;
};

struct pcache_rs_missq {
	struct bio_set bs;
	struct llist_head done;
	struct work_struct work;
	struct workqueue_struct *wq;
	atomic_t inflight;
	void (*fill)(void *ctx);
	void *ctx;
};

/*
 * Per-bio data: of a bio with misses in flight, and of a write map handed to the worker
 * (how far map got, so that the worker commits no chunk again).
 */
struct pcache_rs_io {
	atomic_t remaining;
	int error;
	u64 resume_done;
	u64 resume_persist;
	bool resume_hit;
};

unsigned int pcache_rs_io_size(void)
{
	return sizeof(struct pcache_rs_io);
}

struct bio *pcache_rs_miss_info(struct pcache_rs_miss *m, u64 *off, u32 *at, u32 *len, u32 *tag)
{
	*off = m->off;
	*at = m->at;
	*len = m->len;
	*tag = m->tag;
	return m->orig;
}

static void pcache_rs_missq_work(struct work_struct *work)
{
	struct pcache_rs_missq *q = container_of(work, struct pcache_rs_missq, work);

	if (q->fill)
		q->fill(q->ctx);
}

struct pcache_rs_missq *pcache_rs_missq_create(struct workqueue_struct *wq)
{
	struct pcache_rs_missq *q = kzalloc(sizeof(*q), GFP_KERNEL);

	if (!q)
		return NULL;
	/* A rescuer: clones are allocated in map, under the submitter's bio list. */
	if (bioset_init(&q->bs, BIO_POOL_SIZE, offsetof(struct pcache_rs_miss, clone),
			BIOSET_NEED_BVECS | BIOSET_NEED_RESCUER)) {
		kfree(q);
		return NULL;
	}
	init_llist_head(&q->done);
	INIT_WORK(&q->work, pcache_rs_missq_work);
	q->wq = wq;
	atomic_set(&q->inflight, 0);
	return q;
}

void pcache_rs_missq_bind(struct pcache_rs_missq *q, void (*fill)(void *ctx), void *ctx)
{
	q->ctx = ctx;
	q->fill = fill;
}

/* Waits for every clone in flight and its fill, then frees the queue. */
void pcache_rs_missq_destroy(struct pcache_rs_missq *q)
{
	while (atomic_read(&q->inflight))
		fsleep(1000);
	cancel_work_sync(&q->work);
	bioset_exit(&q->bs);
	kfree(q);
}

static void pcache_rs_miss_endio(struct bio *clone)
{
	struct pcache_rs_miss *m = container_of(clone, struct pcache_rs_miss, clone);
	struct pcache_rs_missq *q = m->q;

	llist_add(&m->node, &q->done);
	queue_work(q->wq, &q->work);
}

/* The bytes @at..@at + @len of @bio, as an iterator over its current data. */
static struct bvec_iter pcache_rs_bio_range(struct bio *bio, u32 at, u32 len)
{
	struct bvec_iter iter = bio->bi_iter;

	bio_advance_iter(bio, &iter, at);
	iter.bi_size = len;
	return iter;
}

/* Copies from @src's data at @si to @dst's at @di, as much as the shorter of the two holds. */
static void pcache_rs_bio_copy(struct bio *dst, struct bvec_iter di, struct bio *src,
			       struct bvec_iter si)
{
	while (si.bi_size && di.bi_size) {
		struct bio_vec s = bio_iter_iovec(src, si);
		struct bio_vec d = bio_iter_iovec(dst, di);
		unsigned int n = min(s.bv_len, d.bv_len);

		memcpy_page(d.bv_page, d.bv_offset, s.bv_page, s.bv_offset, n);
		bio_advance_iter_single(src, &si, n);
		bio_advance_iter_single(dst, &di, n);
	}
}

/* All the data of a miss's own pages (its clone's iterator is spent once it completes). */
static struct bvec_iter pcache_rs_miss_pages(struct pcache_rs_miss *m)
{
	return (struct bvec_iter){ .bi_size = m->len };
}

/*
 * A bio over @len bytes of pages of its own, for the gap at @at of @orig, with @orig's data
 * copied in for a write; NULL when that cannot be had without waiting. It is allocated in
 * map, under the submitter's bio list: waiting there for the bio_set's reserve or for pages,
 * which only clones not yet submitted may hold, could deadlock, so nothing here waits.
 */
static struct bio *pcache_rs_miss_alloc_own(struct pcache_rs_missq *q, struct bio *orig,
					    struct block_device *bdev, u32 at, u32 len)
{
	const gfp_t gfp = GFP_NOWAIT | __GFP_NOWARN;
	unsigned int nr = DIV_ROUND_UP(len, PAGE_SIZE);
	struct bio *clone;
	u32 left;

	/* The target's bios are at most 1 MiB (max_io_len): never more pages than a bio holds. */
	if (nr > BIO_MAX_VECS)
		return NULL;
	clone = bio_alloc_bioset(bdev, nr, orig->bi_opf, gfp, &q->bs);
	if (!clone)
		return NULL;
	for (left = len; left; ) {
		u32 n = min_t(u32, left, PAGE_SIZE);
		struct page *page = alloc_page(gfp);

		if (!page) {
			bio_free_pages(clone);
			bio_put(clone);
			return NULL;
		}
		__bio_add_page(clone, page, n, 0);
		left -= n;
	}
	clone->bi_ioprio = orig->bi_ioprio;
	clone->bi_write_hint = orig->bi_write_hint;
	bio_clone_blkg_association(clone, orig);
	if (op_is_write(bio_op(orig)))
		pcache_rs_bio_copy(clone, clone->bi_iter, orig, pcache_rs_bio_range(orig, at, len));
	return clone;
}

void pcache_rs_miss_submit(struct pcache_rs_missq *q, struct bio *orig,
			   struct block_device *bdev, u64 off, u32 at, u32 len, u32 tag, bool fills)
{
	struct bio *clone = NULL;
	struct pcache_rs_miss *m;
	bool own;

	/*
	 * Only a gap whose data the cache may hold (@fills, and a tag: a read's placeholder or a
	 * write's slot) needs pages of its own; a write zeroes has no data to copy.
	 */
	if (fills && tag && (bio_op(orig) == REQ_OP_READ || bio_op(orig) == REQ_OP_WRITE))
		clone = pcache_rs_miss_alloc_own(q, orig, bdev, at, len);
	own = clone;
	if (!clone) {
		clone = bio_alloc_clone(bdev, orig, GFP_NOIO, &q->bs);
		bio_trim(clone, at >> SECTOR_SHIFT, len >> SECTOR_SHIFT);
	}
	m = container_of(clone, struct pcache_rs_miss, clone);
	m->own = own;
	m->q = q;
	m->orig = orig;
	m->off = off;
	m->at = at;
	m->len = len;
	m->tag = tag;
	clone->bi_iter.bi_sector = off >> SECTOR_SHIFT;
	clone->bi_end_io = pcache_rs_miss_endio;
	/*
	 * A read miss is not a flush: the flags of the original stay with it. A write through
	 * to the backing device is the original, whole: its flush and FUA go with it.
	 */
	if (!op_is_write(bio_op(orig)))
		clone->bi_opf &= ~(REQ_PREFLUSH | REQ_FUA);
	/*
	 * The target takes REQ_NOWAIT whatever the backing device does (io_hints): a bio with it
	 * that needs the backing device ends with BLK_STS_AGAIN in map, so what reaches here is
	 * sent from a context that may wait (the request worker), and the backing device, which
	 * may not take the flag, never sees it.
	 */
	clone->bi_opf &= ~REQ_NOWAIT;
	atomic_inc(&q->inflight);
	submit_bio_noacct(clone);
}

/* The completed misses, oldest last. */
struct pcache_rs_miss *pcache_rs_missq_take(struct pcache_rs_missq *q)
{
	struct llist_node *n = llist_del_all(&q->done);

	return n ? llist_entry(n, struct pcache_rs_miss, node) : NULL;
}

struct pcache_rs_miss *pcache_rs_miss_next(struct pcache_rs_miss *m)
{
	struct llist_node *n = m->node.next;

	return n ? llist_entry(n, struct pcache_rs_miss, node) : NULL;
}

int pcache_rs_miss_error(struct pcache_rs_miss *m)
{
	return blk_status_to_errno(m->clone.bi_status);
}

bool pcache_rs_miss_own(struct pcache_rs_miss *m)
{
	return m->own;
}

/* A completed read into pages of its own: hands its data to the read bio. */
void pcache_rs_miss_deliver(struct pcache_rs_miss *m)
{
	if (!m->own || op_is_write(bio_op(m->orig)))
		return;
	pcache_rs_bio_copy(m->orig, pcache_rs_bio_range(m->orig, m->at, m->len), &m->clone,
			   pcache_rs_miss_pages(m));
}

int pcache_rs_miss_for_each_piece(struct pcache_rs_miss *m, unsigned int skip, unsigned int len,
				  pcache_rs_piece_fn fn, void *ctx)
{
	if (!m->own)
		return -EINVAL;
	return pcache_rs_iter_for_each_piece(&m->clone, pcache_rs_miss_pages(m), skip, len, fn,
					     ctx);
}

/* Frees a filled miss. */
void pcache_rs_miss_put(struct pcache_rs_miss *m)
{
	struct pcache_rs_missq *q = m->q;

	if (m->own)
		bio_free_pages(&m->clone);
	bio_put(&m->clone);
	atomic_dec(&q->inflight);
}

/* @n parts of @bio are to complete (the gaps in flight, and their submitter). */
void pcache_rs_io_start(struct bio *bio, unsigned int n)
{
	struct pcache_rs_io *io = dm_per_bio_data(bio, sizeof(*io));

	io->error = 0;
	atomic_set(&io->remaining, n);
}

void pcache_rs_io_set_resume(struct bio *bio, u64 done, u64 persist, bool hit)
{
	struct pcache_rs_io *io = dm_per_bio_data(bio, sizeof(*io));

	io->resume_done = done;
	io->resume_persist = persist;
	io->resume_hit = hit;
}

void pcache_rs_io_get_resume(struct bio *bio, u64 *done, u64 *persist, bool *hit)
{
	struct pcache_rs_io *io = dm_per_bio_data(bio, sizeof(*io));

	*done = io->resume_done;
	*persist = io->resume_persist;
	*hit = io->resume_hit;
}

/* One part of @bio completed with @err; true for the last, with the first error in *@error. */
bool pcache_rs_io_put(struct bio *bio, int err, int *error)
{
	struct pcache_rs_io *io = dm_per_bio_data(bio, sizeof(*io));

	if (err)
		cmpxchg(&io->error, 0, err);
	if (!atomic_dec_and_test(&io->remaining))
		return false;
	*error = READ_ONCE(io->error);
	return true;
}

void *pcache_rs_subtree_locks_alloc(unsigned int n)
{
	spinlock_t *locks = kvmalloc_array(max(n, 1U), sizeof(*locks), GFP_KERNEL);
	unsigned int i;

	if (!locks)
		return NULL;
	/* One call site, so one lock class for them all. */
	for (i = 0; i < n; i++)
		spin_lock_init(&locks[i]);
	return locks;
}

void pcache_rs_subtree_locks_free(void *locks)
{
	kvfree(locks);
}

void pcache_rs_subtree_lock(void *locks, unsigned int i)
{
	spin_lock(&((spinlock_t *)locks)[i]);
}

void pcache_rs_subtree_unlock(void *locks, unsigned int i)
{
	spin_unlock(&((spinlock_t *)locks)[i]);
}
