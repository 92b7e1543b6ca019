/* Graph passes over the planned steps, after every node has its op's plan: rewrites and links
 * that look at more than one node. In order:
 *   fuse_silu           Sigmoid -> Mul [-> Mul] becomes one SiLU(·mul) step
 *   link_sparse_sources int4 matmuls reading a Sparsify (or CoreInfer mask, or CATS gate
 *                       product) learn their source: they may run input-sparse
 *   stack_groups        channel-major copies, siblings on one input (q/k/v, gate/up) stacked
 *                       into one; low memory drops their dense repack
 *   link_coreinfer      gate/up behind a NeuronMask compute only the kept rows
 *   link_cats           up_proj times a sparsified gate computes only the kept rows
 *   assign_slots        activation buffers reused by liveness, in place where the op allows
 *   mark_direct_fused   a stacked group may write its members' outputs at once */
#include <stdlib.h>
#include <string.h>

#include "ops/ops.h"
#include "weights.h"


static void count_uses(ea_model *m, int *uses) {
    memset(uses, 0, sizeof(int) * (size_t)m->n_values);
    for (int s = 0; s < m->n_steps; s++)
        for (int k = 0; k < 3; k++)
            if (m->steps[s].op != OP_NOP && m->steps[s].in[k] >= 0) uses[m->steps[s].in[k]]++;
    for (int i = 0; i < m->n_values; i++) uses[i] += m->values[i].is_graph_output;
}

/* Sigmoid(g) → Mul(g, sig) → Mul(·, u) becomes one SiluMul(g, u) when the intermediates have
 * no other use; a Sigmoid(g) → Mul(g, sig) that does not feed one becomes SiLU alone (CATS
 * sparsifies it before the gate·up Mul; docs/performance.md, "SiLU"). */
static void fuse_silu(ea_model *m, int *uses) {
    for (int s = 0; s < m->n_steps; s++) {
        step *sg = &m->steps[s];
        if (sg->op != OP_SIGMOID || uses[sg->out] != 1) continue;
        int g = sg->in[0], m1 = -1, m2 = -1;
        for (int j = s + 1; j < m->n_steps && m1 < 0; j++) {
            step *t = &m->steps[j];
            if (t->op == OP_MUL && ((t->in[0] == g && t->in[1] == sg->out) || (t->in[1] == g && t->in[0] == sg->out)))
                m1 = j;
        }
        if (m1 < 0) continue;
        step *s1 = &m->steps[m1];
        for (int j = m1 + 1; j < m->n_steps && m2 < 0 && uses[s1->out] == 1; j++) {
            step *t = &m->steps[j];
            if (t->op == OP_MUL && (t->in[0] == s1->out || t->in[1] == s1->out)) m2 = j;
        }
        step *t = m2 >= 0 ? &m->steps[m2] : NULL;
        const int u = t ? (t->in[0] == s1->out ? t->in[1] : t->in[0]) : -1;
        if (t && u != s1->out) {
            t->op = OP_SILU_MUL;
            t->op_type = "SiluMul";
            t->in[0] = g;
            t->in[1] = u;
            s1->op = OP_NOP;
        } else {
            s1->op = OP_SILU;
            s1->op_type = "Silu";
            s1->in[0] = g;
            s1->in[1] = -1;
        }
        sg->op = OP_NOP;
    }
    count_uses(m, uses);
}

/* A stacked GEMV may write all its members' outputs when the first one runs if nothing
 * runs between them and their buffers are their own: consecutive steps reading one live
 * input free no slot before the last, so each later member's slot is idle from the first
 * on; distinct slots rule out an unused output whose slot the next member reuses. */
static void mark_direct_fused(ea_model *m) {
    for (int g = 0; g < m->n_fused; g++) {
        fused_gemv *f = &m->fused[g];
        int ok = 1;
        for (int i = 0; i < f->n && ok; i++) {
            const step *st = &m->steps[f->step[i]];
            const value *o = st->out >= 0 ? &m->values[st->out] : NULL;
            /* no CoreInfer kept-rows member: that branch would write its own output */
            ok = f->step[i] == f->step[0] + i && !st->row_src && o && o->kind == V_ACT && o->width == st->qw.N &&
                 o->slot != m->values[st->in[0]].slot;
            for (int k = 0; k < i && ok; k++) ok = o->slot != m->values[m->steps[f->step[k]].out].slot;
        }
        f->direct = ok;
    }
}

/* The file layout of st's weight (rows contiguous; float minimums read back from the repack,
 * whose owner dropped them) in one allocation of its own, for the
 * output-row kernel: the file's pages were released after the repack, and read back at
 * random through 4 KB pages of the mapping the rows kernel ran at half the dense GEMV's
 * speed (TLB misses, page faults); docs/performance.md, "CATS row copy". */
static int rows_copy(ea_model *m, step *st) {
    const ea_qweight *w = &st->qw;
    if (!w->packed) return 0; /* no repack (scalar isa): the kernels read the file layout anyway */
    const ea_qbytes fb = ea_qweight_file_bytes((size_t)w->N, (size_t)w->n_blocks, w->block_size, w->bits);
    const size_t sb = fb.scales, db = fb.data, zb = w->zero_points ? fb.zero_points : 0;
    const size_t mb = w->has_minimums ? fb.scales : 0; /* float minimums, [N, n_blocks] as the scales */
    uint8_t *buf = ea_alloc_weights(sb + mb + db + zb);
    if (!buf) return -1;
    float *mins = mb ? (float *)(buf + sb) : NULL;
    memcpy(buf, w->scales, sb);
    memcpy(buf + sb + mb, w->data, db);
    if (zb) memcpy(buf + sb + mb + db, w->zero_points, zb);
    int rc = 0;
    for (int n = 0; mins && n < w->N && !rc; n++) rc = ea_qweight_row_minimums(w, n, mins + (size_t)n * w->n_blocks);
    if (!rc)
        rc = mins ? ea_qweight_init_min(&st->rows_qw, EA_ISA_SCALAR, w->K, w->N, w->bits, w->block_size, buf + sb + mb,
                                        (const float *)buf, mins)
                  : ea_qweight_init(&st->rows_qw, EA_ISA_SCALAR, w->K, w->N, w->bits, w->block_size, buf + sb + mb,
                                    (const float *)buf, zb ? buf + sb + mb + db : NULL);
    if (rc) {
        free(buf);
        return -1;
    }
    st->rows_buf = buf;
    m->bytes_repacked += sb + mb + db + zb;
    /* reading them for the copy mapped the file's pages back in */
    ea_release_pages(m, w->data, db);
    ea_release_pages(m, w->scales, sb);
    if (zb) ea_release_pages(m, w->zero_points, zb);
    return 0;
}

static int assign_slots(ea_model *m, ea_err *err) {
    for (int s = 0; s < m->n_steps; s++) {
        step *st = &m->steps[s];
        if (st->op == OP_NOP) continue;
        for (int k = 0; k < 3; k++)
            if (st->in[k] >= 0 && m->values[st->in[k]].kind == V_ACT) m->values[st->in[k]].last_use = s;
    }
    for (int i = 0; i < m->n_values; i++) {
        value *v = &m->values[i];
        if (v->kind != V_ACT) continue;
        if (v->is_graph_output) v->last_use = m->n_steps;
        else if (v->last_use < v->producer) v->last_use = v->producer; /* unused: freed right away */
    }
    int cap = 0;
    int *free_slot = calloc((size_t)m->n_values + 1, sizeof(int));
    if (!free_slot) return ea_fail(err, "out of memory");
    for (int s = 0; s < m->n_steps; s++) {
        step *st = &m->steps[s];
        if (st->op == OP_NOP || st->out < 0 || m->values[st->out].kind != V_ACT) continue;
        value *o = &m->values[st->out];
        value *a = st->in[0] >= 0 ? &m->values[st->in[0]] : NULL;
        const int inplace_ok = ea_ops[st->op]->inplace;
        if (inplace_ok && a && a->kind == V_ACT && a->last_use == s && !a->is_graph_output && a->width == o->width &&
            st->in[1] != st->in[0]) {
            o->slot = a->slot;
            st->inplace = 1;
        } else {
            int best = -1;
            for (int k = 0; k < m->n_slots; k++)
                if (free_slot[k] && (best < 0 || (m->slot_width[k] >= o->width && m->slot_width[best] < o->width) ||
                                     (m->slot_width[k] >= o->width && m->slot_width[k] < m->slot_width[best])))
                    best = k;
            if (best < 0) {
                if (m->n_slots == cap) {
                    int nc = cap ? cap * 2 : 8;
                    int *w = realloc(m->slot_width, sizeof(int) * (size_t)nc);
                    if (!w) {
                        free(free_slot);
                        return ea_fail(err, "out of memory");
                    }
                    m->slot_width = w;
                    cap = nc;
                }
                best = m->n_slots++;
                m->slot_width[best] = 0;
            }
            free_slot[best] = 0;
            if (m->slot_width[best] < o->width) m->slot_width[best] = o->width;
            o->slot = best;
        }
        /* release what dies here (the output's own slot stays taken) */
        for (int k = 0; k < 3; k++) {
            int vi = st->in[k];
            if (vi < 0 || m->values[vi].kind != V_ACT || m->values[vi].last_use != s) continue;
            if (m->values[vi].slot != o->slot) free_slot[m->values[vi].slot] = 1;
        }
        if (o->last_use == s) free_slot[o->slot] = 1;
    }
    free(free_slot);
    return 0;
}

static void link_sparse_sources(ea_model *m) {
    /* int4 matmuls fed by a Sparsify get a channel-major copy for the input-sparse GEMV;
     * siblings reading the same input share one, stacked along N */
    for (int s = 0; s < m->n_steps; s++) {
        step *st = &m->steps[s];
        if (st->op != OP_QMATMUL || st->qw.bits != 4 || st->f32act || st->in[0] < 0) continue;
        int p = m->values[st->in[0]].producer;
        /* CATS: down reads SiLU(gate), sparsified, times up; its zeros are the Sparsify's */
        if (p >= 0 && p < m->n_steps && m->steps[p].op == OP_MUL)
            for (int k = 0, mul = p; k < 2; k++) {
                const int v = m->steps[mul].in[k], q = v >= 0 ? m->values[v].producer : -1;
                if (q >= 0 && q < m->n_steps && m->steps[q].op == OP_SPARSIFY &&
                    m->values[m->steps[q].out].width == m->values[st->in[0]].width)
                    p = q;
            }
        if (p < 0 || p >= m->n_steps || (m->steps[p].op != OP_SPARSIFY && m->steps[p].op != OP_NEURON_MASK)) continue;
        st->sparse_src = p + 1;
    }
}

static int stack_groups(ea_model *m, ea_err *err) {
    m->fused = calloc((size_t)m->n_steps / 2 + 1, sizeof *m->fused);
    if (!m->fused) return ea_fail(err, "out of memory"), EA_ERR_NOMEM;
    for (int s = 0; s < m->n_steps; s++) {
        step *st = &m->steps[s];
        if (!st->sparse_src || st->cm_ready || st->fuse) continue;
        const ea_qweight *ws[EA_FUSE_MAX] = {&st->qw};
        int members[EA_FUSE_MAX] = {s}, nm = 1;
        for (int t = s + 1; t < m->n_steps && nm < EA_FUSE_MAX; t++) {
            const step *o = &m->steps[t];
            if (o->sparse_src && !o->fuse && o->in[0] == st->in[0] && o->qw.K == st->qw.K &&
                o->qw.block_size == st->qw.block_size && !o->qw.zero_points == !st->qw.zero_points &&
                !o->qw.has_minimums == !st->qw.has_minimums) {
                ws[nm] = &o->qw;
                members[nm++] = t;
            }
        }
        const char *what = nm > 1 ? "stacked channel-major repack" : "channel-major repack";
        ea_qweight_cm *cm = nm > 1 ? &m->fused[m->n_fused].cm : &st->cm;
        int krc = ea_qweight_cm_init_concat(cm, m->isa, ws, nm);
        if (krc)
            return ea_fail(err, "node '%s': %s failed: %s", st->name, what, ea_kernels_strerror(krc)),
                   krc == EA_KERR_NOMEM ? EA_ERR_NOMEM : EA_ERR_FORMAT;
        m->bytes_repacked += cm->bytes;
        if (nm > 1) {
            fused_gemv *g = &m->fused[m->n_fused++];
            g->n = nm;
            for (int i = 0, off = 0; i < nm; off += ws[i]->N, i++) {
                g->step[i] = members[i];
                m->steps[members[i]].fuse = m->n_fused;
                m->steps[members[i]].fuse_off = off;
            }
            if (cm->N > m->max_fused_n) m->max_fused_n = cm->N;
        } else {
            st->cm_ready = 1;
        }
        for (int i = 0; i < nm; i++) {
            step *mi = &m->steps[members[i]];
            if (!mi->qw.packed) continue;
            ea_release_pages(m, mi->qw.data,
                             ea_qweight_file_bytes((size_t)mi->qw.N, (size_t)mi->qw.n_blocks, mi->qw.block_size, mi->qw.bits).data);
            /* low memory: the repack goes; decode and prefill rows all run the input-sparse GEMV
             * (scalar weights have no repack and keep their dense path on the file layout) */
            if (m->sparse_lowmem) {
                m->bytes_repacked -= mi->qw.packed_bytes;
                ea_qweight_release(&mi->qw);
                mi->dense_dropped = 1;
            }
        }
    }
    return EA_OK;
}

static void link_coreinfer(ea_model *m, const int *uses) {
    for (int s = 0; s < m->n_steps; s++) {
        if (m->steps[s].op != OP_NEURON_MASK) continue;
        const int p = m->values[m->steps[s].in[0]].producer;
        if (p < 0 || m->steps[p].op != OP_SILU_MUL || uses[m->steps[s].in[0]] != 1) continue;
        for (int k = 0; k < 2; k++) {
            const int v = m->steps[p].in[k], q = v >= 0 ? m->values[v].producer : -1;
            if (q >= 0 && m->steps[q].op == OP_QMATMUL && !m->steps[q].f32act && uses[v] == 1)
                m->steps[q].row_src = s + 1;
        }
    }
}

static void link_cats(ea_model *m, const int *uses) {
    for (int s = 0; s < m->n_steps; s++) {
        step *st = &m->steps[s];
        if (st->op != OP_QMATMUL || st->f32act || st->sparse_src || st->row_src || st->fuse || st->out < 0 ||
            uses[st->out] != 1 || !st->qw.data)
            continue;
        for (int t = s + 1; t < m->n_steps; t++) {
            const step *mul = &m->steps[t];
            if (mul->op != OP_MUL || (mul->in[0] != st->out && mul->in[1] != st->out)) continue;
            const int other = mul->in[0] == st->out ? mul->in[1] : mul->in[0];
            const int q = other >= 0 && other != st->out ? m->values[other].producer : -1;
            if (q >= 0 && q < s && m->steps[q].op == OP_SPARSIFY && m->values[other].width == st->N &&
                rows_copy(m, st) == 0)
                st->rowsel_src = q + 1;
            break;
        }
    }
}

int ea_plan_passes(ea_model *m, ea_err *err) {
    int *uses = malloc(sizeof(int) * (size_t)m->n_values + 1);
    if (!uses) return ea_fail(err, "out of memory"), EA_ERR_NOMEM;
    count_uses(m, uses);
    fuse_silu(m, uses);
    link_sparse_sources(m);
    int rc = stack_groups(m, err);
    if (!rc) {
        count_uses(m, uses);
        link_coreinfer(m, uses);
        link_cats(m, uses);
        if (assign_slots(m, err)) rc = EA_ERR_FORMAT;
        else mark_direct_fused(m);
    }
    free(uses);
    return rc;
}
