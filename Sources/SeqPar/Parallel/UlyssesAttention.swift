// ulysses: DeepSpeed-Ulysses (Jacobs et al., 2023). One all-to-all turns the sequence-sharded q, k, v into
// head-sharded ones over the whole sequence, each rank runs the blockwise kernel on its heads, and one all-to-all
// brings o (and lse) back to the sequence-sharded layout.
//
// Rank j takes query heads [j H/P, (j+1) H/P) and the kv heads they read. Two cases work: P divides G (each rank
// gets G/P kv heads), or each rank's H/P query heads fall inside one kv head (H/P divides H/G; that kv head is sent
// to every rank that needs it, and in backward their dK, dV partial sums add up at the owner). Otherwise a clear
// error: P must divide H, and P must divide G or H/P divide H/G.
// Per rank: head-sharded q, o (B, L, H/P, D), k, v (B, L, G', D); lse (B, H/P, L).
// Communication: forward two all-to-alls (q, k, v in one; o and lse back in one). Backward two: q, k, v, o, dO and
// lse in, dq, dk, dv back. No point-to-point messages. Memory per rank grows as L * (H + 2G) * D / P.
// Precision: in an fp32 run everything travels in fp32. In a bf16 run q, k, v, o and dO travel as bf16 (half the
// bytes; o is the run's output, which a bf16 run stores in bf16 anyway), lse and the gradients dq, dk, dv in fp32
// (dk, dv are summed at the owner where kv heads are shared). A mixed all-to-all carries its fp32 parts as pairs of
// 16-bit words, bit for bit, so each exchange stays one all-to-all. Received bf16 is widened exactly for the kernel.

public struct UlyssesAttention: AttentionAlgorithm {
    public init() {}

    /// Which heads each rank takes.
    public struct HeadSplit {
        public let ranks: Int, heads: Int, group: Int
        public init(ranks: Int, shape: AttentionShape) { (self.ranks, heads, group) = (ranks, shape.heads, shape.groupSize) }
        public var headsPerRank: Int { heads / ranks }
        public func queryHeads(_ j: Int) -> Range<Int> { (j * headsPerRank)..<((j + 1) * headsPerRank) }
        public func kvHeads(_ j: Int) -> Range<Int> {
            let q = queryHeads(j)
            return (q.lowerBound / group)..<((q.upperBound - 1) / group + 1)
        }
        /// The head-sharded problem each rank solves: H/P query heads over kv heads `kvHeads(j)` (the same count on every rank).
        public func localShape(_ s: AttentionShape) -> AttentionShape {
            AttentionShape(batch: s.batch, seqLen: s.seqLen, heads: headsPerRank, kvHeads: kvHeads(0).count, headDim: s.headDim)
        }

        public static func validate(ranks: Int, shape: AttentionShape) throws {
            let (h, g) = (shape.heads, shape.kvHeads)
            let fits = divisors(h).filter { p in g % p == 0 || (h / g) % (h / p) == 0 }
            let advice = "run it on a number of ranks in \(fits.map(String.init).joined(separator: ", ")), or choose ring, which splits the sequence instead"
            guard h % ranks == 0 else {
                throw SeqParError.invalidInput("--algorithm ulysses gives each rank heads/P query heads, and \(ranks) ranks do not divide --heads \(h): \(advice)")
            }
            guard g % ranks == 0 || (h / g) % (h / ranks) == 0 else {
                throw SeqParError.invalidInput("--algorithm ulysses on \(ranks) ranks gives each rank \(h / ranks) query heads, and with --kv-heads \(g) (\(h / g) query heads per kv head) those straddle kv heads: the ranks must divide --kv-heads \(g), or heads/P must divide heads/kv-heads; \(advice)")
            }
        }
    }

    /// One part of an exchange: a (B, tokens, heads, D) tensor, the heads each rank takes, and whether it travels as
    /// bf16 (its values rounded to bf16) or as fp32.
    struct Part {
        var tensor: Tensor
        var heads: (Int) -> Range<Int>
        var bf16 = false
    }

    /// One all-to-all: `parts` are sequence-sharded (B, C, heads, D) tensors; each rank receives its heads of every
    /// part over the whole sequence, in global order: (B, L, heads_j, D) each, into `outputs` (which say nothing
    /// about the wire: the parts do).
    /// `back` reverses it: head-sharded parts in, sequence-sharded out (`add` sums parts that arrive more than once).
    static func exchange(_ parts: [Part], toHeads: Bool, outputs: [Tensor], add: Bool = false,
                         x: LocalAttention, comm: some Communicator) throws {
        let (ranks, layout, length) = (comm.size, x.options.partition, x.shape.seqLen)
        try exchange(parts, toHeads: toHeads, outputs: outputs, add: add, headRows: (0..<ranks).map { layout.positions(rank: $0, ranks: ranks, length: length) },
                     tokens: x.tokens, batch: x.shape.batch, comm: comm)
    }

    /// The same among the ranks of `comm` with the head-sharded side's rows given: rank j's `tokens` (this rank's
    /// count) sequence-side rows are rows `headRows[j]` of the head-sharded tensors (USP: the rows of a Ulysses
    /// group's tokens, in position order, within the group's union of positions).
    static func exchange(_ parts: [Part], toHeads: Bool, outputs: [Tensor], add: Bool = false,
                         headRows positions: [[Int]], tokens: Int, batch: Int, comm: some Communicator) throws {
        let (rank, ranks) = (comm.rank, comm.size)
        precondition(!add || parts.allSatisfy { !$0.bf16 }, "parts that add up travel in fp32")
        // Sequence-sharded side: my tokens 0..<C, heads of rank j. Head-sharded side: rank i's positions, my heads.
        func rows(_ j: Int, seqSide: Bool) -> [Int] { seqSide ? Array(0..<tokens) : positions[j] }
        func headsOf(_ p: Int, _ j: Int, seqSide: Bool) -> Range<Int> {
            let r = parts[p].heads(seqSide ? j : rank)
            return seqSide ? r : 0..<r.count
        }
        /// Bytes of rank j's share of every part.
        func bytes(_ j: Int, seqSide: Bool) -> Int {
            parts.indices.reduce(0) {
                $0 + batch * rows(j, seqSide: seqSide).count * headsOf($1, j, seqSide: seqSide).count * parts[$1].tensor.shape[3] * (parts[$1].bf16 ? 2 : 4)
            }
        }
        // The sending side is the sequence side going to heads, and the head side coming back.
        let sendBytes = (0..<ranks).map { bytes($0, seqSide: toHeads) }
        let recvBytes = (0..<ranks).map { bytes($0, seqSide: !toHeads) }
        let (sendTotal, recvTotal) = (sendBytes.reduce(0, +), recvBytes.reduce(0, +))
        // All fp32: the exchange is fp32 (MPI_FLOAT), as it always was. With bf16 parts: 16-bit words (an fp32 part
        // as two words an element, bit for bit).
        let fp32 = parts.allSatisfy { !$0.bf16 }
        let word = fp32 ? 4 : 2
        let send = UnsafeMutableRawPointer.allocate(byteCount: max(sendTotal, 4), alignment: 64)
        let recv = UnsafeMutableRawPointer.allocate(byteCount: max(recvTotal, 4), alignment: 64)
        defer { send.deallocate(); recv.deallocate() }
        if fp32 {
            send.bindMemory(to: Float.self, capacity: max(sendTotal, 4) / 4)
            recv.bindMemory(to: Float.self, capacity: max(recvTotal, 4) / 4)
        } else {
            send.bindMemory(to: UInt16.self, capacity: max(sendTotal, 4) / 2)
            recv.bindMemory(to: UInt16.self, capacity: max(recvTotal, 4) / 2)
        }
        var cursor = send
        for j in 0..<ranks {
            for (p, part) in parts.enumerated() {
                copyHeads(part.tensor, rows: rows(j, seqSide: toHeads), heads: headsOf(p, j, seqSide: toHeads), packed: &cursor,
                          pack: true, add: false, bf16: part.bf16, batch: batch)
            }
        }
        func allToAll<W: CommElement>(_: W.Type) throws {
            try comm.allToAllV(UnsafeBufferPointer(start: send.assumingMemoryBound(to: W.self), count: sendTotal / word), counts: sendBytes.map { $0 / word },
                               into: UnsafeMutableBufferPointer(start: recv.assumingMemoryBound(to: W.self), count: recvTotal / word),
                               counts: recvBytes.map { $0 / word })
        }
        if fp32 { try allToAll(Float.self) } else { try allToAll(UInt16.self) }
        cursor = recv
        for i in 0..<ranks {
            for (p, out) in outputs.enumerated() {
                copyHeads(out, rows: rows(i, seqSide: !toHeads), heads: headsOf(p, i, seqSide: !toHeads), packed: &cursor,
                          pack: false, add: add, bf16: parts[p].bf16, batch: batch)
            }
        }
    }

    /// Copies between a (B, T, heads, D) tensor's `rows` x `heads` and a packed (B, rows, heads, D) run at `packed`:
    /// fp32 as it is, or (`bf16`) rounded to bf16 words going out and widened coming in.
    static func copyHeads(_ t: Tensor, rows: [Int], heads: Range<Int>, packed: inout UnsafeMutableRawPointer, pack: Bool, add: Bool,
                          bf16: Bool, batch: Int) {
        let (tokens, allHeads, dim) = (t.shape[1], t.shape[2], t.shape[3])
        let n = heads.count * dim, bytes = n * (bf16 ? 2 : 4)
        for b in 0..<batch {
            for r in rows {
                let row = t.pointer + ((b * tokens + r) * allHeads + heads.lowerBound) * dim
                if bf16 {
                    let words = packed.assumingMemoryBound(to: UInt16.self)
                    if pack { BF16.convert(row, to: words, n) } else { BF16.convert(words, to: row, n) }
                } else if pack {
                    packed.copyMemory(from: row, byteCount: bytes)
                } else if add {
                    // Only all-fp32 exchanges add: the run is 4-byte aligned.
                    let src = packed.assumingMemoryBound(to: Float.self)
                    for i in 0..<n { row[i] += src[i] }
                } else {
                    UnsafeMutableRawPointer(row).copyMemory(from: packed, byteCount: bytes)
                }
                packed += bytes
            }
        }
    }

    /// lse (B, H, C) as a (B, C, H, 1) tensor, so it travels like the others; and back.
    static func lseAsRows(_ lse: Tensor) -> Tensor { lse.swappingAxes12().reshaped([lse.shape[0], lse.shape[2], lse.shape[1], 1]) }
    static func lseFromRows(_ t: Tensor) -> Tensor { t.reshaped([t.shape[0], t.shape[1], t.shape[2]]).swappingAxes12() }

    public func forward(_ x: LocalAttention, comm: some Communicator) throws -> AttentionOutput {
        let split = HeadSplit(ranks: comm.size, shape: x.shape)
        let local = split.localShape(x.shape)
        let bf16 = x.options.precision == .bf16
        if bf16 { try OneDNN.require() }
        let (length, all) = (x.shape.seqLen, Array(0..<x.shape.seqLen))
        let q = Tensor(zeros: local.qShape(tokens: length)), k = Tensor(zeros: local.kvShape(tokens: length)), v = Tensor(zeros: k.shape)
        try Self.exchange([Part(tensor: x.q, heads: split.queryHeads, bf16: bf16), Part(tensor: x.k, heads: split.kvHeads, bf16: bf16),
                           Part(tensor: x.v, heads: split.kvHeads, bf16: bf16)], toHeads: true, outputs: [q, k, v], x: x, comm: comm)
        let result = SoftmaxAttention.forward(q: q, qPositions: all, k: k, v: v, kPositions: all, causal: x.options.causal, documents: x.options.documents, scale: x.scale, precision: x.options.precision)
        let o = Tensor(zeros: x.q.shape), lseRows = Tensor(zeros: [x.shape.batch, x.tokens, x.shape.heads, 1])
        try Self.exchange([Part(tensor: result.o, heads: split.queryHeads, bf16: bf16), Part(tensor: Self.lseAsRows(result.lse), heads: split.queryHeads)],
                          toHeads: false, outputs: [o, lseRows], x: x, comm: comm)
        return AttentionOutput(o: o, lse: Self.lseFromRows(lseRows))
    }

    public func backward(_ x: LocalAttention, output: AttentionOutput, gradOut: Tensor, comm: some Communicator) throws -> AttentionGradients {
        let split = HeadSplit(ranks: comm.size, shape: x.shape)
        let local = split.localShape(x.shape)
        let bf16 = x.options.precision == .bf16
        if bf16 { try OneDNN.require() }
        let (length, all) = (x.shape.seqLen, Array(0..<x.shape.seqLen))
        let q = Tensor(zeros: local.qShape(tokens: length)), k = Tensor(zeros: local.kvShape(tokens: length)), v = Tensor(zeros: k.shape)
        let o = Tensor(zeros: q.shape), dO = Tensor(zeros: q.shape), lseRows = Tensor(zeros: [x.shape.batch, length, local.heads, 1])
        try Self.exchange([Part(tensor: x.q, heads: split.queryHeads, bf16: bf16), Part(tensor: x.k, heads: split.kvHeads, bf16: bf16),
                           Part(tensor: x.v, heads: split.kvHeads, bf16: bf16), Part(tensor: output.o, heads: split.queryHeads, bf16: bf16),
                           Part(tensor: gradOut, heads: split.queryHeads, bf16: bf16), Part(tensor: Self.lseAsRows(output.lse), heads: split.queryHeads)],
                          toHeads: true, outputs: [q, k, v, o, dO, lseRows], x: x, comm: comm)
        let g = SoftmaxAttention.backward(q: q, qPositions: all, k: k, v: v, kPositions: all,
                                          output: AttentionOutput(o: o, lse: Self.lseFromRows(lseRows)), gradOut: dO,
                                          causal: x.options.causal, documents: x.options.documents, scale: x.scale, precision: x.options.precision)
        let dq = Tensor(zeros: x.q.shape), dk = Tensor(zeros: x.k.shape), dv = Tensor(zeros: x.v.shape)
        try Self.exchange([Part(tensor: g.dq, heads: split.queryHeads), Part(tensor: g.dk, heads: split.kvHeads), Part(tensor: g.dv, heads: split.kvHeads)],
                          toHeads: false, outputs: [dq, dk, dv], add: true, x: x, comm: comm)
        return AttentionGradients(dq: dq, dk: dk, dv: dv)
    }
}
