// Linear attention across ranks: LASP-2 (one AllGather of the memory states) and LASP-1 (the states passed along
// the chain of ranks), written once, differing only in how the states travel (`StateExchange`).
//
// Rank r holds the contiguous chunk [start_r, end_r) of C_r tokens; φ is the feature map, λ_h the decay of head h.
// Forward, causal:
//   M_r = Σ_{j in r} λ^(end_r-1-j) φ(k_j)^T v_j                     this chunk's state (B, H, D, D)
//   S_<r = prefix over m < r of S ← λ^(C_m) S + M_m                 the decayed state of every earlier chunk
//   o_i = intra-chunk masked sum (LinearAttention.chunk) + λ^(i+1) φ(q_i) S_<r
// Bidirectional (no decay): o = φ(q) Σ_m M_m.
// Backward, causal (dO given):
//   dM_r = Σ_{s in r} λ^(s-start_r) φ(q_s)^T dO_s,  dS_>r = suffix over m > r of dS ← λ^(C_m) dS + dM_m
//   dφq = forward chunk (dO, v, φk) + λ^(i+1) dO S_<r^T
//   dφk = reverse chunk (v, dO, φq) + λ^(C-j) v dS_>r^T,  dv = reverse chunk (φk, φq, dO) + λ^(C-j) φk dS_>r
//   then dq = dφq ⊙ φ'(q), dk = dφk ⊙ φ'(k). Bidirectional: the chunk terms vanish and S, dS are the totals.
// The forward pass keeps S_<r (or the total) in `AttentionOutput.saved` for dq; without it, backward recomputes it.
//
// LASP-2: the states go out in **one** AllGather (P x B x H x D x D floats, independent of L), started before the
// intra-chunk term is computed and tested between its blocks so it moves meanwhile; each rank then folds the
// prefix (or suffix, or total) itself and adds the inter-chunk term. LASP-1, as its paper gives it (Sun et al. 2024,
// Algorithms 2 and 3): the intra-chunk terms in parallel, then a sequential pass along the chain of ranks: receive
// the state S_<r from rank r-1, add the inter-chunk term, form this chunk's state M_r, send S_<r+1 on; P-1
// dependent steps (twice that for the bidirectional total, which comes back down the chain), each carrying those
// two products (4 H C D^2 FLOPs forward; the backward's dK and dV terms and dM, 6 H C D^2) besides the message.
// LASP-2's reordering takes the products off that path: every M_r before any exchange, the inter-chunk terms after.
// Both fold with `LinearAttention.carry` in the same order, so they agree bit for bit.
//
// Packed documents (`options.documents`): o_s = Σ_{j <= s, doc(j) = doc(s)} λ^(s-j) (φ(q_s)·φ(k_j)) v_j; the state
// restarts at each document start. Every rank knows the documents and the partition, so it knows without any message
// where documents start in every chunk (`ChunkDocuments`). With f_r, l_r the first and last start in chunk r (f_r =
// C_r, l_r = 0 without one; position 0 of the sequence does not count, nothing precedes it):
//   M_r = Σ_{j >= l_r} λ^(end_r-1-j) φ(k_j)^T v_j        only the document that continues into later chunks
//   S_<r: m = 0 ... r-1,  S ← (chunk m holds a start ? M_m : λ^(C_m) S + M_m)
//   o_i = intra-chunk (the kernel, masked by document, its block state restarting) + λ^(i+1) φ(q_i) S_<r for i < f_r
//   dM_r = Σ_{s < f_r} λ^(s-start_r) φ(q_s)^T dO_s,  dS_>r: m = P-1 ... r+1, dS ← (start in m ? dM_m : λ^(C_m) dS + dM_m)
//   the dq term on rows i < f_r, the dk and dv terms on rows j >= l_r (the keys whose document reaches later chunks).
// Still one AllGather per pass, of the same size; LASP-1's chain restarts the same way, and the two still agree bit
// for bit. Bidirectional: o_s = φ(q_s) Σ_{j in doc(s)} φ(k_j)^T v_j. A document inside a chunk is local (its own
// state and term: two small products per document); the ones at the chunk's two ends may span ranks. Each rank sends
// two states in the one AllGather (2 x P x B x H x D x D floats), T_r (its rows from l_r) and H_r (its rows before
// f_r); without a start both are W_r, the whole chunk. U_<r, the prefix fold of the T's, and V_>r, the suffix fold of
// the H's, both restarting as above (λ = 1), give the end documents' totals U_<r + H_r and T_r + V_>r (U_<r + W_r +
// V_>r for a chunk inside one document). LASP-1 passes U up the chain and V down it (2(P-1) messages, as for the
// bidirectional total without documents). Backward sums φ(q)^T dO the same way. One document (`Documents(single:)`)
// is no documents: the same code path, bit for bit.
// Linear attention has no softmax: `AttentionOutput.lse` is empty (B, H, 0).
// Precision (`options.precision`): bf16 runs every product of the kernels on oneDNN with bf16 operands (q, k, v, dO,
// φ(q), φ(k), the masked blocks, and a bf16 copy of a state where it multiplies rows; LinearAttentionBF16.swift), and
// keeps every state in fp32: M_r, dM_r, the folds S_<r, dS_>r and totals, and what travels: LASP-2's AllGather and
// LASP-1's chain messages carry fp32 states (P x B x H x D x D x 4 bytes, the same as an fp32 run: a state is an
// accumulator, and it is independent of L, so halving it would save little). The caller rounds the inputs and the
// final o, dq, dk, dv to bf16; the kernels add into fp32 accumulators.
import Foundation

/// How the per-rank states travel.
enum StateExchange: Sendable {
    /// LASP-2: one AllGather of every rank's state.
    case allGather
    /// LASP-1: point-to-point along the chain of ranks.
    case chain

    /// Which fold of the other ranks' states a rank needs. `prefixAndSuffix` (bidirectional with documents): each
    /// rank's state is two stacked (2, B, H, D, D), and the fold is the prefix fold of the first and the suffix fold of
    /// the second, stacked the same way.
    enum Fold { case prefix, suffix, total, prefixAndSuffix }

    static let chainTag = 400

    /// A started exchange: `test` drives it between blocks of computation; `finish` waits, runs `use` on the fold
    /// (the inter-chunk terms: on the chain it runs before this rank's state is formed and sent on, as LASP-1 orders
    /// it) and returns the fold.
    struct Pending {
        let test: () -> Void
        let finish: (_ use: (Tensor) -> Void) throws -> Tensor
    }

    /// Starts exchanging this rank's state (B, H, D, D) = `shape`, which `mine` computes: at once for the AllGather,
    /// after the state from the previous rank has arrived on the chain. `counts` are the ranks' token counts;
    /// `restarts[m]` (empty: none) says that chunk m holds a document start, so its state replaces the fold instead of
    /// adding to it (prefix, suffix and prefixAndSuffix folds).
    func start(_ mine: @escaping () -> Tensor, shape: [Int], fold: Fold, counts: [Int], decay: [Float], restarts: [Bool] = [],
               comm: some Communicator) throws -> Pending {
        let (r, p) = (comm.rank, comm.size)
        let ones = [Float](repeating: 1, count: decay.count)
        let restart = { (m: Int) in m < restarts.count && restarts[m] }
        func add(_ s: Tensor, _ m: Int, _ state: Tensor) {
            LinearAttention.carry(s, adding: state, tokens: counts[m], decay: decay, restart: restart(m))
        }
        /// State `i` of a (2, B, H, D, D) stack.
        func half(_ t: Tensor, _ i: Int) -> Tensor { t.rows(i..<(i + 1)).reshaped(shape) }
        switch self {
        case .allGather:
            let mine = mine()
            let all = Tensor(uninitialized: [p] + mine.shape)
            let request = try comm.iallGather(UnsafeBufferPointer(mine.buffer), into: all.buffer)
            return Pending(test: { _ = try? request.test() }, finish: { use in
                try request.wait()
                let out = Tensor(zeros: mine.shape)
                let block = { (m: Int) in all.rows(m..<(m + 1)).reshaped(mine.shape) }
                switch fold {
                case .prefix: for m in 0..<r { add(out, m, block(m)) }
                case .suffix: for m in ((r + 1)..<p).reversed() { add(out, m, block(m)) }
                case .total: for m in 0..<p { LinearAttention.carry(out, adding: block(m), tokens: counts[m], decay: ones) }
                case .prefixAndSuffix:
                    for m in 0..<r { add(half(out, 0), m, half(block(m), 0)) }
                    for m in ((r + 1)..<p).reversed() { add(half(out, 1), m, half(block(m), 1)) }
                }
                use(out)
                return out
            })
        case .chain where fold == .prefixAndSuffix:
            // The first states travel up (prefix), the second down (suffix), each a chain of P-1 messages.
            let (fromBelow, fromAbove) = (Tensor(zeros: shape), Tensor(zeros: shape))
            let up = r > 0 ? try comm.irecv(fromBelow.buffer, from: r - 1, tag: Self.chainTag) : nil
            let down = r < p - 1 ? try comm.irecv(fromAbove.buffer, from: r + 1, tag: Self.chainTag + 1) : nil
            return Pending(test: { _ = try? up?.test(); _ = try? down?.test() }, finish: { use in
                try up?.wait()
                let own = mine()
                if r < p - 1 {
                    let outgoing = fromBelow.copy()
                    add(outgoing, r, half(own, 0))
                    try comm.send(UnsafeBufferPointer(outgoing.buffer), to: r + 1, tag: Self.chainTag)
                }
                try down?.wait()
                if r > 0 {
                    let outgoing = fromAbove.copy()
                    add(outgoing, r, half(own, 1))
                    try comm.send(UnsafeBufferPointer(outgoing.buffer), to: r - 1, tag: Self.chainTag + 1)
                }
                let out = Tensor(uninitialized: [2] + shape)
                half(out, 0).pointer.update(from: fromBelow.pointer, count: fromBelow.count)
                half(out, 1).pointer.update(from: fromAbove.pointer, count: fromAbove.count)
                use(out)
                return out
            })
        case .chain:
            // prefix and total travel up (from r-1 to r+1), suffix down; the total then comes back down.
            let up = fold != .suffix
            let (from, to) = up ? (r - 1, r + 1) : (r + 1, r - 1)
            let incoming = Tensor(zeros: shape)
            let tag = Self.chainTag + (up ? 0 : 1)
            let request = (0..<p).contains(from) ? try comm.irecv(incoming.buffer, from: from, tag: tag) : nil
            return Pending(test: { _ = try? request?.test() }, finish: { use in
                try request?.wait()
                // Causal: the inter-chunk terms, then this chunk's state, then the send (the paper's order).
                if fold != .total { use(incoming) }
                let outgoing = incoming.copy()
                if fold == .total {
                    LinearAttention.carry(outgoing, adding: mine(), tokens: counts[r], decay: ones)
                } else {
                    add(outgoing, r, mine())
                }
                if (0..<p).contains(to) { try comm.send(UnsafeBufferPointer(outgoing.buffer), to: to, tag: tag) }
                guard fold == .total else { return incoming }
                // The last rank holds the total; it travels back down the chain.
                var total = outgoing
                if r < p - 1 {
                    total = Tensor(uninitialized: shape)
                    try comm.recv(total.buffer, from: r + 1, tag: Self.chainTag + 2)
                }
                if r > 0 { try comm.send(UnsafeBufferPointer(total.buffer), to: r - 1, tag: Self.chainTag + 2) }
                use(total)
                return total
            })
        }
    }
}

/// Where packed documents start in each rank's chunk (contiguous chunks of `counts` tokens), as every rank works it
/// out from the documents and the partition: nothing about it travels.
struct ChunkDocuments: Sendable {
    /// Per rank, the chunk's rows where a document starts, ascending. Position 0 of the sequence is left out (nothing
    /// precedes it), so one document, or none, gives no starts anywhere: the plain path.
    let starts: [[Int]]
    let counts: [Int]

    init(_ documents: Documents?, counts: [Int]) {
        self.counts = counts
        guard let documents, documents.count > 1 else {
            starts = counts.map { _ in [] }
            return
        }
        var first = 0
        var offsets = documents.offsets.dropLast().dropFirst()[...]  // the starts after position 0, ascending
        starts = counts.map { c in
            defer { first += c }
            var mine: [Int] = []
            while let o = offsets.first, o < first + c {
                mine.append(o - first)
                offsets = offsets.dropFirst()
            }
            return mine
        }
    }

    /// Chunk m holds a document start: its state replaces the folds instead of adding to them.
    var restarts: [Bool] { starts.map { !$0.isEmpty } }
    /// Rows of chunk m before its first start: the document that began on an earlier chunk (all rows without a start).
    func head(_ m: Int) -> Range<Int> { 0..<(starts[m].first ?? counts[m]) }
    /// Rows of chunk m from its last start: the document that continues into later chunks (all rows without a start).
    func tail(_ m: Int) -> Range<Int> { (starts[m].last ?? 0)..<counts[m] }
    /// Rows of chunk m's documents that lie wholly inside it (between two of its starts).
    func inner(_ m: Int) -> [Range<Int>] { zip(starts[m], starts[m].dropFirst()).map { $0..<$1 } }
}

/// LASP-2 (`exchange: .allGather`) or LASP-1 (`.chain`).
public struct LinearSequenceParallel: AttentionAlgorithm {
    let name: AlgorithmName
    let exchange: StateExchange
    init(_ name: AlgorithmName, exchange: StateExchange) { self.name = name; self.exchange = exchange }

    /// What both passes derive from the inputs.
    struct Chunk {
        let causal: Bool
        let precision: Precision
        let heads: Int
        let decay: [Float]
        let counts: [Int]
        let rank: Int
        let documents: ChunkDocuments
        /// Bidirectional over several documents: the (head, tail) pieces travel instead of one state.
        let spanning: Bool
        let fq: Tensor, fk: Tensor

        /// `x.options.documents` must cover the sequence (`AlgorithmName.validate` checks it).
        init(_ x: LocalAttention, rank: Int, ranks: Int) {
            causal = x.options.causal
            precision = x.options.precision
            heads = x.shape.heads
            decay = causal ? x.options.decayPerHead(heads) : Array(repeating: 1, count: heads)
            counts = x.options.partition.counts(ranks: ranks, length: x.shape.seqLen)
            self.rank = rank
            documents = ChunkDocuments(x.options.documents, counts: counts)
            spanning = !causal && (x.options.documents?.count ?? 1) > 1
            let first = counts[..<rank].reduce(0, +)
            precondition(x.tokens == counts[rank] && x.positions.first.map { $0 == first } ?? true, "LASP needs contiguous chunks of the partition's counts")
            fq = x.options.featureMap.apply(x.q)
            fk = x.options.featureMap.apply(x.k)
        }

        var starts: [Int] { documents.starts[rank] }
        var head: Range<Int> { documents.head(rank) }
        var tail: Range<Int> { documents.tail(rank) }

        /// Bidirectional with documents: this chunk's pieces of the documents at its ends, (2, B, H, D, D): the state
        /// of its rows from its last start, then of its rows before its first (both the whole chunk without a start).
        func pieces(_ b: Tensor, _ c: Tensor) -> Tensor {
            let (t, h) = (state(b, c, rows: tail), state(b, c, rows: head))
            let out = Tensor(uninitialized: [2] + t.shape)
            out.pointer.update(from: t.pointer, count: t.count)
            (out.pointer + t.count).update(from: h.pointer, count: h.count)
            return out
        }

        /// The totals (2, B, H, D, D) of the documents at the chunk's start and end, from its `pieces` and the folds
        /// [U_<r, V_>r]: U + H and T + V, or U + W + V for a chunk inside one document (both halves).
        func endTotals(pieces own: Tensor, folds: Tensor) -> Tensor {
            let n = own.count / 2
            let out = Tensor(uninitialized: own.shape)
            let (first, last) = (out.rows(0..<1), out.rows(1..<2))
            let (u, v, t, h) = (folds.rows(0..<1), folds.rows(1..<2), own.rows(0..<1), own.rows(1..<2))
            first.pointer.update(from: u.pointer, count: n)
            BLAS.axpy(h, into: first)
            if documents.restarts[rank] {
                last.pointer.update(from: t.pointer, count: n)
                BLAS.axpy(v, into: last)
            } else {
                BLAS.axpy(v, into: first)
                last.pointer.update(from: first.pointer, count: n)
            }
            return out
        }

        /// Bidirectional with documents: the chunk's rows of the documents at its ends, each with its total state from
        /// `totals` (`endTotals`): the rows before the first start, and (with a start) those from the last.
        func ends(_ totals: Tensor) -> [(rows: Range<Int>, state: Tensor)] {
            let shape = Array(totals.shape.dropFirst())
            var out: [(rows: Range<Int>, state: Tensor)] = []
            if !head.isEmpty { out.append((head, totals.rows(0..<1).reshaped(shape))) }
            if documents.restarts[rank] && !tail.isEmpty { out.append((tail, totals.rows(1..<2).reshaped(shape))) }
            return out
        }

        /// The rows of the documents wholly inside the chunk (local: their states need no exchange).
        var inner: [Range<Int>] { documents.inner(rank) }

        /// The state of `rows` of (b, c), in this run's precision (decay: forward, as the chunk passes it on).
        func state(_ b: Tensor, _ c: Tensor, rows: Range<Int>, direction: LinearAttention.Direction = .forward) -> Tensor {
            LinearAttention.state(b, c, heads: heads, decay: decay, direction: direction, rows: rows, precision: precision)
        }

        /// `out += ` the state term of `a` with `state` on `rows`.
        func term(_ a: Tensor, _ state: Tensor, transposed: Bool = false, rows: Range<Int>, direction: LinearAttention.Direction = .forward, into out: Tensor) {
            LinearAttention.addStateTerm(a, state: state, transposed: transposed, heads: heads, decay: decay, direction: direction,
                                         rows: rows, precision: precision, into: out)
        }
    }

    /// The shape of a state: (B, H, D, D).
    func stateShape(_ x: LocalAttention) -> [Int] { [x.shape.batch, x.shape.heads, x.shape.headDim, x.shape.headDim] }

    /// The forward exchange: starts it, adds the local terms to `o` (when given) while it moves, then the inter-chunk
    /// terms; returns what backward keeps: S_<r (causal), the total (bidirectional), or the end documents' totals
    /// (bidirectional with documents). Backward without a saved state calls it with no `o`.
    func forwardExchange(_ x: LocalAttention, _ c: Chunk, comm: some Communicator, into o: Tensor?) throws -> Tensor {
        let shape = stateShape(x)
        if c.spanning {
            let own = c.pieces(c.fk, x.v)
            let pending = try exchange.start({ own }, shape: shape, fold: .prefixAndSuffix, counts: c.counts, decay: c.decay,
                                             restarts: c.documents.restarts, comm: comm)
            if let o {
                for rows in c.inner {
                    c.term(c.fq, c.state(c.fk, x.v, rows: rows), rows: rows, into: o)
                    pending.test()
                }
            }
            let totals = c.endTotals(pieces: own, folds: try pending.finish { _ in })
            if let o { for (rows, s) in c.ends(totals) { c.term(c.fq, s, rows: rows, into: o) } }
            return totals
        }
        let mine = { c.state(c.fk, x.v, rows: c.tail) }
        let pending = try exchange.start(mine, shape: shape, fold: c.causal ? .prefix : .total, counts: c.counts, decay: c.decay,
                                         restarts: c.documents.restarts, comm: comm)
        if let o, c.causal {
            LinearAttention.chunk(c.fq, c.fk, x.v, heads: c.heads, decay: c.decay, direction: .forward, starts: c.starts,
                                  precision: c.precision, into: o, progress: pending.test)
        }
        return try pending.finish { s in if let o { c.term(c.fq, s, rows: c.head, into: o) } }
    }

    public func forward(_ x: LocalAttention, comm: some Communicator) throws -> AttentionOutput {
        try name.validate(ranks: comm.size, shape: x.shape, options: x.options)
        if x.options.precision == .bf16 { try OneDNN.require() }
        let c = Chunk(x, rank: comm.rank, ranks: comm.size)
        let o = Tensor(zeros: x.q.shape)
        let state = try forwardExchange(x, c, comm: comm, into: o)
        return AttentionOutput(o: o, lse: Tensor(zeros: [x.shape.batch, x.shape.heads, 0]), saved: state)
    }

    public func backward(_ x: LocalAttention, output: AttentionOutput, gradOut dO: Tensor, comm: some Communicator) throws -> AttentionGradients {
        try name.validate(ranks: comm.size, shape: x.shape, options: x.options)
        if x.options.precision == .bf16 { try OneDNN.require() }
        let c = Chunk(x, rank: comm.rank, ranks: comm.size)
        let state = try output.saved ?? forwardExchange(x, c, comm: comm, into: nil)
        let (dq, dk, dv) = (Tensor(zeros: x.q.shape), Tensor(zeros: x.k.shape), Tensor(zeros: x.v.shape))
        if c.spanning {
            let own = c.pieces(c.fq, dO)
            let pending = try exchange.start({ own }, shape: stateShape(x), fold: .prefixAndSuffix, counts: c.counts, decay: c.decay,
                                             restarts: c.documents.restarts, comm: comm)
            for rows in c.inner {
                let (s, dS) = (c.state(c.fk, x.v, rows: rows), c.state(c.fq, dO, rows: rows))
                c.term(dO, s, transposed: true, rows: rows, into: dq)
                c.term(x.v, dS, transposed: true, rows: rows, into: dk)
                c.term(c.fk, dS, rows: rows, into: dv)
                pending.test()
            }
            for (rows, s) in c.ends(state) { c.term(dO, s, transposed: true, rows: rows, into: dq) }
            for (rows, dS) in c.ends(c.endTotals(pieces: own, folds: try pending.finish { _ in })) {
                c.term(x.v, dS, transposed: true, rows: rows, into: dk)
                c.term(c.fk, dS, rows: rows, into: dv)
            }
        } else {
            let dMine = { c.state(c.fq, dO, rows: c.head, direction: .reverse) }
            let pending = try exchange.start(dMine, shape: stateShape(x), fold: c.causal ? .suffix : .total, counts: c.counts, decay: c.decay,
                                             restarts: c.documents.restarts, comm: comm)
            if c.causal {
                LinearAttention.chunk(dO, x.v, c.fk, heads: c.heads, decay: c.decay, direction: .forward, starts: c.starts, precision: c.precision, into: dq, progress: pending.test)
                LinearAttention.chunk(x.v, dO, c.fq, heads: c.heads, decay: c.decay, direction: .reverse, starts: c.starts, precision: c.precision, into: dk, progress: pending.test)
                LinearAttention.chunk(c.fk, c.fq, dO, heads: c.heads, decay: c.decay, direction: .reverse, starts: c.starts, precision: c.precision, into: dv, progress: pending.test)
            }
            c.term(dO, state, transposed: true, rows: c.head, into: dq)
            _ = try pending.finish { dState in
                c.term(x.v, dState, transposed: true, rows: c.tail, direction: .reverse, into: dk)
                c.term(c.fk, dState, rows: c.tail, direction: .reverse, into: dv)
            }
        }
        x.options.featureMap.backward(dq, input: x.q)
        x.options.featureMap.backward(dk, input: x.k)
        return AttentionGradients(dq: dq, dk: dk, dv: dv)
    }
}
