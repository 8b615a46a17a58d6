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

    /// Which fold of the other ranks' states a rank needs.
    enum Fold { case prefix, suffix, total }

    static let chainTag = 400

    /// A started exchange: `test` drives it between blocks of computation; `finish` waits, runs `use` on the fold
    /// (the inter-chunk terms: on the chain it runs before this rank's state is formed and sent on, as LASP-1 orders
    /// it) and returns the fold.
    struct Pending {
        let test: () -> Void
        let finish: (_ use: (Tensor) -> Void) throws -> Tensor
    }

    /// Starts exchanging this rank's state (B, H, D, D), which `mine` computes: at once for the AllGather, after the
    /// state from the previous rank has arrived on the chain. `counts` are the ranks' token counts.
    func start(_ mine: @escaping () -> Tensor, shape: [Int], fold: Fold, counts: [Int], decay: [Float], comm: some Communicator) throws -> Pending {
        let (r, p) = (comm.rank, comm.size)
        let ones = [Float](repeating: 1, count: decay.count)
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
                case .prefix: for m in 0..<r { LinearAttention.carry(out, adding: block(m), tokens: counts[m], decay: decay) }
                case .suffix: for m in ((r + 1)..<p).reversed() { LinearAttention.carry(out, adding: block(m), tokens: counts[m], decay: decay) }
                case .total: for m in 0..<p { LinearAttention.carry(out, adding: block(m), tokens: counts[m], decay: ones) }
                }
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
                LinearAttention.carry(outgoing, adding: mine(), tokens: counts[r], decay: fold == .total ? ones : decay)
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
        let fq: Tensor, fk: Tensor

        init(_ x: LocalAttention, ranks: Int) {
            causal = x.options.causal
            precision = x.options.precision
            heads = x.shape.heads
            decay = causal ? x.options.decayPerHead(heads) : Array(repeating: 1, count: heads)
            counts = x.options.partition.counts(ranks: ranks, length: x.shape.seqLen)
            fq = x.options.featureMap.apply(x.q)
            fk = x.options.featureMap.apply(x.k)
        }
    }

    /// This rank's state M_r, for the exchange to compute when it needs it.
    func forwardState(_ x: LocalAttention, _ c: Chunk) -> () -> Tensor {
        { LinearAttention.state(c.fk, x.v, heads: c.heads, decay: c.decay, direction: .forward, precision: c.precision) }
    }

    /// The shape of a state: (B, H, D, D).
    func stateShape(_ x: LocalAttention) -> [Int] { [x.shape.batch, x.shape.heads, x.shape.headDim, x.shape.headDim] }

    /// S_<r (causal) or the total state, exchanged.
    func prefixState(_ x: LocalAttention, _ c: Chunk, comm: some Communicator) throws -> Tensor {
        try exchange.start(forwardState(x, c), shape: stateShape(x), fold: c.causal ? .prefix : .total, counts: c.counts, decay: c.decay, comm: comm)
            .finish { _ in }
    }

    public func forward(_ x: LocalAttention, comm: some Communicator) throws -> AttentionOutput {
        try name.validate(ranks: comm.size, shape: x.shape, options: x.options)
        if x.options.precision == .bf16 { try OneDNN.require() }
        let c = Chunk(x, ranks: comm.size)
        let pending = try exchange.start(forwardState(x, c), shape: stateShape(x), fold: c.causal ? .prefix : .total, counts: c.counts, decay: c.decay, comm: comm)
        let o = Tensor(zeros: x.q.shape)
        if c.causal {
            LinearAttention.chunk(c.fq, c.fk, x.v, heads: c.heads, decay: c.decay, direction: .forward, precision: c.precision, into: o, progress: pending.test)
        }
        let state = try pending.finish { s in
            LinearAttention.addStateTerm(c.fq, state: s, heads: c.heads, decay: c.decay, direction: .forward, precision: c.precision, into: o)
        }
        return AttentionOutput(o: o, lse: Tensor(zeros: [x.shape.batch, x.shape.heads, 0]), saved: state)
    }

    public func backward(_ x: LocalAttention, output: AttentionOutput, gradOut dO: Tensor, comm: some Communicator) throws -> AttentionGradients {
        try name.validate(ranks: comm.size, shape: x.shape, options: x.options)
        if x.options.precision == .bf16 { try OneDNN.require() }
        let c = Chunk(x, ranks: comm.size)
        let state = try output.saved ?? prefixState(x, c, comm: comm)
        let dMine = { LinearAttention.state(c.fq, dO, heads: c.heads, decay: c.decay, direction: .reverse, precision: c.precision) }
        let pending = try exchange.start(dMine, shape: stateShape(x), fold: c.causal ? .suffix : .total, counts: c.counts, decay: c.decay, comm: comm)
        let (dq, dk, dv) = (Tensor(zeros: x.q.shape), Tensor(zeros: x.k.shape), Tensor(zeros: x.v.shape))
        if c.causal {
            LinearAttention.chunk(dO, x.v, c.fk, heads: c.heads, decay: c.decay, direction: .forward, precision: c.precision, into: dq, progress: pending.test)
            LinearAttention.chunk(x.v, dO, c.fq, heads: c.heads, decay: c.decay, direction: .reverse, precision: c.precision, into: dk, progress: pending.test)
            LinearAttention.chunk(c.fk, c.fq, dO, heads: c.heads, decay: c.decay, direction: .reverse, precision: c.precision, into: dv, progress: pending.test)
        }
        LinearAttention.addStateTerm(dO, state: state, transposed: true, heads: c.heads, decay: c.decay, direction: .forward, precision: c.precision, into: dq)
        _ = try pending.finish { dState in
            LinearAttention.addStateTerm(x.v, state: dState, transposed: true, heads: c.heads, decay: c.decay, direction: .reverse, precision: c.precision, into: dk)
            LinearAttention.addStateTerm(c.fk, state: dState, heads: c.heads, decay: c.decay, direction: .reverse, precision: c.precision, into: dv)
        }
        x.options.featureMap.backward(dq, input: x.q)
        x.options.featureMap.backward(dk, input: x.k)
        return AttentionGradients(dq: dq, dk: dk, dv: dv)
    }
}
