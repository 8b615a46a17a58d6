// ring: ring attention with blockwise online softmax (Liu et al., "Ring Attention with Blockwise Transformers for
// Near-Infinite Context", 2023; the shape of zhuzilin/ring-flash-attention).
//
// Per rank: q (B, C, H, D) stays; its K and V, packed as one buffer [K | V] (2 * B * C * G * D floats), travel around
// the ring r -> r+1. At step s a rank holds the block of rank (r - s) mod P: it posts the exchange of that block to
// the next rank, computes its queries against the block with the blockwise kernel (testing the exchange between query
// tiles so MPI moves it meanwhile), folds the result into (o, lse), then waits. Causal: a block entirely after every
// local query is skipped; the kernel masks the rest. With --layout zigzag every rank does the same causal work.
// Backward: K and V travel again (sent ahead of the compute); dK and dV accumulators travel one step behind their
// block, each rank adding its queries' contribution after its kernel (so the accumulator's transfer overlaps the next
// kernel). The accumulator of rank b's block starts empty at rank b+1 and reaches home after the last step; the owner
// computes its own block in two halves of its work (query tiles), the first before any block arrives and the second
// while the last accumulators travel home, so every transfer has compute to hide behind (`Ring.circulate`'s `tail`).
// dQ stays local.
// Communication: forward P-1 messages per rank (one packed K/V block each); backward P-1 K/V blocks plus P-1 dK/dV
// blocks. Memory per rank grows as C * G * D (two K/V blocks, two gradient blocks), not L.
// Precision: in an fp32 run everything travels in fp32. In a bf16 run the K/V blocks travel as bf16 (UInt16 bits,
// half the bytes) and head-major, (B, G, C, D), and go to the kernel's bf16 products as they arrived, every head
// contiguous (q and dO are converted once per pass, head-major too); the dK/dV
// accumulators travel in fp32 (they are sums over ranks, as in ring-flash-attention). (o, lse) stay fp32: the bf16 kernel
// extends them block by block (its online softmax carries on from the previous blocks' result, no merge pass), the fp32
// kernel's block results merge in log space.
// Packed documents: consecutive documents are gathered into groups of at least `groupShare` tokens a rank, and each
// group goes round the ring on its own, one after the other (`documentGroups`), as if its documents were a sequence
// alone: a step's block holds one group's keys (at most 3.5 MB a rank in the benchmark below), where one ring over
// the whole packed sequence moves every document's chunks at each step (16 MB a rank at 64K tokens, H=8, D=128 in
// bf16). There the products took 12-19% more time than the per-document runs' for the same FLOPs
// (benchmarks/results/documents-usp/run-rounds); in groups they take 12-13% less, and the packed sequence costs what
// its documents cost alone (run-groups).

public struct RingAttention: AttentionAlgorithm {
    /// How the exchange in flight progresses during a block's compute (see `RingProgress`).
    public var progress: RingProgress
    /// Packed documents: the fewest tokens a rank holds of a group of consecutive documents that goes round the ring
    /// on its own (`documentGroups`); 0 sends the whole sequence round as one ring.
    public var groupShare: Int
    public init(progress: RingProgress = .standard, groupShare: Int = 256) { (self.progress, self.groupShare) = (progress, groupShare) }

    /// The K/V blocks use this tag, their dK/dV accumulators the next one.
    static let kvTag = 300

    /// Elements of a packed [K | V] block of `tokens` tokens.
    static func packedCount(_ x: LocalAttention, tokens: Int) -> Int {
        2 * x.shape.batch * tokens * x.shape.kvHeads * x.shape.headDim
    }

    /// The global positions of each rank's tokens (the block it sends round the ring): the partition's, or in USP
    /// those of each ring member's Ulysses group.
    typealias BlockPositions = (_ rank: Int) -> [Int]

    static func partitionPositions(_ x: LocalAttention, ranks: Int) -> BlockPositions {
        let (layout, length) = (x.options.partition, x.shape.seqLen)
        let all = (0..<ranks).map { layout.positions(rank: $0, ranks: ranks, length: length) }
        return { all[$0] }
    }

    static func pack(_ k: Tensor, _ v: Tensor) -> Tensor {
        let t = Tensor(zeros: [k.count + v.count])
        t.pointer.update(from: k.pointer, count: k.count)
        (t.pointer + k.count).update(from: v.pointer, count: v.count)
        return t
    }

    /// The packed block a bf16 run sends: [K | V] rounded to bf16, each head-major (B, G, C, D), so that the kernel
    /// reads every head in place, contiguous (`SoftmaxAttention.BF16Operand.heads`).
    static func packBF16(_ k: Tensor, _ v: Tensor) -> BF16Tensor {
        let t = BF16Tensor(uninitialized: [k.count + v.count])
        BF16Tensor.convertHeadMajor(k, into: t.pointer)
        BF16Tensor.convertHeadMajor(v, into: t.pointer + k.count)
        return t
    }

    /// Views of K and V inside a packed block of `tokens` tokens.
    static func unpack(_ t: Tensor, _ x: LocalAttention, tokens: Int) -> (k: Tensor, v: Tensor) {
        let shape = x.shape.kvShape(tokens: tokens), n = shape.reduce(1, *)
        return (t.rows(0..<n).reshaped(shape), t.rows(n..<(2 * n)).reshaped(shape))
    }

    /// K and V inside a packed bf16 block of `tokens` tokens, head-major (`packBF16`), as the kernel's operands.
    static func unpack(_ t: BF16Tensor, _ x: LocalAttention, tokens: Int) -> (k: SoftmaxAttention.BF16Operand, v: SoftmaxAttention.BF16Operand) {
        let s = x.shape.kvShape(tokens: tokens), n = s.reduce(1, *)
        let heads = [s[0], s[2], s[1], s[3]]
        return (.heads(t.rows(0..<n).reshaped(heads)), .heads(t.rows(n..<(2 * n)).reshaped(heads)))
    }

    /// True when no local query can see any key of the block (causal, or documents), or either side is empty.
    static func skips(_ x: LocalAttention, keys: [Int]) -> Bool {
        guard let firstKey = keys.first, let lastQuery = x.positions.last else { return true }
        if x.options.causal && firstKey > lastQuery { return true }
        return x.options.documents != nil && x.windows(keys: keys).isEmpty
    }

    public func forward(_ x: LocalAttention, comm: some Communicator) throws -> AttentionOutput {
        let blocks = Self.partitionPositions(x, ranks: comm.size)
        guard let groups = documentGroups(x, blocks: blocks, ranks: comm.size) else { return try forward(x, blocks: blocks, comm: comm) }
        let out = AttentionOutput(o: Tensor(zeros: x.q.shape), lse: Tensor(zeros: [x.shape.batch, x.shape.heads, x.tokens]))
        for g in groups {
            let part = try forward(x.tokens(g.rows), blocks: g.blocks, comm: comm)
            out.o.setTokens(g.rows, from: part.o)
            out.lse.setColumns(g.rows, from: part.lse)
        }
        return out
    }

    public func backward(_ x: LocalAttention, output: AttentionOutput, gradOut: Tensor, comm: some Communicator) throws -> AttentionGradients {
        let blocks = Self.partitionPositions(x, ranks: comm.size)
        guard let groups = documentGroups(x, blocks: blocks, ranks: comm.size) else {
            return try backward(x, blocks: blocks, output: output, gradOut: gradOut, comm: comm)
        }
        let grads = AttentionGradients(dq: Tensor(zeros: x.q.shape), dk: Tensor(zeros: x.k.shape), dv: Tensor(zeros: x.v.shape))
        for g in groups {
            let part = try backward(x.tokens(g.rows), blocks: g.blocks, output: AttentionOutput(o: output.o.tokens(g.rows), lse: output.lse.columns(g.rows)),
                                    gradOut: gradOut.tokens(g.rows), comm: comm)
            grads.dq.setTokens(g.rows, from: part.dq)
            grads.dk.setTokens(g.rows, from: part.dk)
            grads.dv.setTokens(g.rows, from: part.dv)
        }
        return grads
    }

    /// One ring of a packed sequence's documents (`documentGroups`): this rank's rows of it, and every rank's block.
    struct DocumentGroup {
        let rows: Range<Int>
        let blocks: BlockPositions
    }

    /// Packed documents as groups that each go round the ring alone: consecutive documents until a group holds at
    /// least `groupShare` tokens on every rank (the last group takes what is left); nil for one group (one ring, as
    /// without documents). A group's queries see only its own keys, so each ring computes exactly what the one ring
    /// over the whole sequence would for them, tile for tile (the kernels' tiles start at each document's first
    /// query and key either way). Every rank derives the same groups from the partition.
    func documentGroups(_ x: LocalAttention, blocks: BlockPositions, ranks: Int) -> [DocumentGroup]? {
        guard groupShare > 0, let documents = x.options.documents, documents.count > 1 else { return nil }
        let all = (0..<ranks).map(blocks)
        /// Indices of `positions` (ascending) inside global positions `range`.
        func rows(_ positions: [Int], _ range: Range<Int>) -> Range<Int> {
            let first = { LinearAttention.BlockDocuments.firstIndex(in: positions, atLeast: $0) }
            return first(range.lowerBound)..<first(range.upperBound)
        }
        var ranges: [Range<Int>] = []
        var start = 0
        for end in documents.offsets.dropFirst() where all.allSatisfy({ rows($0, start..<end).count >= groupShare }) {
            ranges.append(start..<end)
            start = end
        }
        guard !ranges.isEmpty else { return nil }
        if start < documents.seqLen { ranges[ranges.count - 1] = ranges[ranges.count - 1].lowerBound..<documents.seqLen }
        guard ranges.count > 1 else { return nil }
        return ranges.map { range in
            let blocks = all.map { Array($0[rows($0, range)]) }
            return DocumentGroup(rows: rows(x.positions, range), blocks: { blocks[$0] })
        }
    }

    /// The forward pass with each rank's block at `blocks(rank)` (x.positions are this rank's).
    func forward(_ x: LocalAttention, blocks: @escaping BlockPositions, comm: some Communicator) throws -> AttentionOutput {
        switch x.options.precision {
        case .fp32: return try forward(x, own: Self.pack(x.k, x.v), blocks: blocks, comm: comm)
        case .bf16:
            try OneDNN.require()
            return try forward(x, own: Self.packBF16(x.k, x.v), blocks: blocks, comm: comm)
        }
    }

    /// The backward pass with each rank's block at `blocks(rank)`.
    func backward(_ x: LocalAttention, blocks: @escaping BlockPositions, output: AttentionOutput, gradOut: Tensor, comm: some Communicator) throws -> AttentionGradients {
        switch x.options.precision {
        case .fp32: return try backward(x, own: Self.pack(x.k, x.v), blocks: blocks, output: output, gradOut: gradOut, comm: comm)
        case .bf16:
            try OneDNN.require()
            return try backward(x, own: Self.packBF16(x.k, x.v), blocks: blocks, output: output, gradOut: gradOut, comm: comm)
        }
    }

    /// The forward pass with `own` (this rank's packed [K | V], fp32 or bf16) circulating.
    func forward<Block: RingBlock>(_ x: LocalAttention, own: Block, blocks: @escaping BlockPositions, comm: some Communicator) throws -> AttentionOutput {
        let acc = AttentionOutput(o: Tensor(zeros: x.q.shape), lse: Tensor(zeros: [x.shape.batch, x.shape.heads, x.tokens]))
        acc.lse.fill(-.infinity)
        // A bf16 block goes to the kernel as it arrived, with q converted once for the whole pass.
        let q16 = Block.self == BF16Tensor.self ? BF16Tensor(roundingHeadMajor: x.q) : nil
        try Ring.circulate(own, shape: { [Self.packedCount(x, tokens: blocks($0).count)] }, tag: Self.kvTag, progress: self.progress, comm: comm) { source, block, _, progress in
            let keys = blocks(source)
            if Self.skips(x, keys: keys) { return }
            if let q16, let block = block as? BF16Tensor {
                let (k, v) = Self.unpack(block, x, tokens: keys.count)
                SoftmaxAttention.forward(q: .heads(q16), qPositions: x.positions, k: k, v: v, kPositions: keys, causal: x.options.causal,
                                         documents: x.options.documents, scale: x.scale, extending: acc, progress: progress)
                return
            }
            // Otherwise an fp32 run: Block is Tensor (RingBlock's other conformance).
            let (k, v) = Self.unpack(block as! Tensor, x, tokens: keys.count)
            LSEMerge.merge(into: acc, SoftmaxAttention.forward(q: x.q, qPositions: x.positions, k: k, v: v, kPositions: keys,
                                                               causal: x.options.causal, documents: x.options.documents, scale: x.scale, precision: x.options.precision,
                                                               progress: progress))
        }
        return acc
    }

    /// The backward pass with `own` (this rank's packed [K | V], fp32 or bf16) circulating; dK/dV travel in fp32.
    func backward<Block: RingBlock>(_ x: LocalAttention, own ownBlock: Block, blocks: @escaping BlockPositions, output: AttentionOutput, gradOut: Tensor,
                                    comm: some Communicator) throws -> AttentionGradients {
        let (rank, ranks) = (comm.rank, comm.size)
        let dq = Tensor(zeros: x.q.shape)
        // dK and dV of a block whose accumulator is still on its way: summed here, added when it has arrived.
        let largest = (0..<ranks).map { Self.packedCount(x, tokens: blocks($0).count) }.max() ?? 0
        let scratch = ranks > 2 ? Tensor(zeros: [largest]) : nil
        // A bf16 block goes to the kernel as it arrived, with q and dO converted once for the whole pass.
        let bf16Queries = Block.self == BF16Tensor.self ? (BF16Tensor(roundingHeadMajor: x.q), BF16Tensor(roundingHeadMajor: gradOut)) : nil
        /// This rank's queries against one block: `work` of the kernel (see `SoftmaxAttention.backward`), dQ added
        /// to dq, dK and dV to the block's accumulator: at once when it is here, else through `scratch`.
        func contribute(_ source: Int, _ block: Block, _ grad: RingAccumulator, work: Range<Double>, _ progress: () -> Void) throws {
            let keys = blocks(source)
            if Self.skips(x, keys: keys) { return }
            let count = 2 * x.shape.batch * keys.count * x.shape.kvHeads * x.shape.headDim
            let sums = grad.ready ?? scratch!.rows(0..<count)
            if grad.ready == nil { sums.fill(0) }
            let (dk, dv) = Self.unpack(sums, x, tokens: keys.count)
            let adding = AttentionGradients(dq: dq, dk: dk, dv: dv)
            if let (q16, dO16) = bf16Queries, let block = block as? BF16Tensor {
                let (k, v) = Self.unpack(block, x, tokens: keys.count)
                SoftmaxAttention.backward(q: .heads(q16), qPositions: x.positions, k: k, v: v, kPositions: keys, output: output, gradOut: gradOut,
                                          gradOutBF16: .heads(dO16), causal: x.options.causal, documents: x.options.documents, scale: x.scale, adding: adding, work: work, progress: progress)
            } else {
                let (k, v) = Self.unpack(block as! Tensor, x, tokens: keys.count)  // an fp32 run: Block is Tensor
                SoftmaxAttention.backward(q: x.q, qPositions: x.positions, k: k, v: v, kPositions: keys, output: output, gradOut: gradOut,
                                          causal: x.options.causal, documents: x.options.documents, scale: x.scale, precision: x.options.precision, adding: adding,
                                          work: work, progress: progress)
            }
            if grad.ready == nil { BLAS.axpy(sums, into: try grad.get()) }
        }
        let own = Self.ownShares(ranks: ranks)
        let home = try Ring.circulate(ownBlock, shape: { [Self.packedCount(x, tokens: blocks($0).count)] }, tag: Self.kvTag,
                                      accumulate: true, progress: self.progress, comm: comm,
                                      tail: own.last.map { last in { home, progress in
                                          try contribute(rank, ownBlock, RingAccumulator(ready: home!, get: { home! }), work: last, progress)
                                      } }) { source, block, grad, progress in
            try contribute(source, block, grad!, work: source == rank ? own.first : 0..<1, progress)
        }
        let (dk, dv) = Self.unpack(home!, x, tokens: x.tokens)
        return AttentionGradients(dq: dq, dk: dk, dv: dv)
    }

    /// The shares of its own block's backward work (`SoftmaxAttention.backward`'s `work`) a rank does at the first
    /// step, while the first K/V block arrives, and after the last, while the last dK/dV accumulators travel home
    /// (one rank computes alone: all of it at once).
    static func ownShares(ranks: Int) -> (first: Range<Double>, last: Range<Double>?) {
        ranks == 1 ? (0..<1, nil) : (0..<0.5, 0.5..<1)
    }
}
