// usp: 2D sequence parallelism, Ulysses x ring (USP: Fang and Zhao, "USP: A Unified Sequence Parallelism Approach for
// Long Context Generative AI", 2024, as yunchang implements it; Transformer Engine's a2a+p2p; LoongTrain's 2D
// attention).
//
// The P ranks form a grid of U x R (U = --ulysses-degree, R = P / U). Ulysses group g holds the U consecutive ranks
// g U ..< (g + 1) U, so `mpirun` placing ranks in order (--map-by core or slot, the default) puts a group on one host;
// ring member u of every group forms ring u. Two sub-communicators (`Communicator.split`): the group (color g, key u)
// and the ring (color u, key g).
//   1. All-to-all inside the group (Ulysses' exchange): each rank's sequence chunk becomes its H/U query heads (and
//      their kv heads) over the group's tokens, the union of its U ranks' positions in position order.
//   2. Ring attention across the R groups, on those heads: the K/V block of ring member g is group g's tokens.
//   3. All-to-all back: o and lse return to the sequence-sharded layout.
// Backward the same way: q, k, v, o, dO and lse to heads; ring attention's backward across groups (dK, dV travel
// with their blocks); dq, dk, dv back (summed where a kv head serves several ranks' query heads).
// Layout: any `Partition` (contiguous, zigzag, with documents). Zigzag over P ranks gives each group the union of
// U consecutive ranks' chunks, which is zigzag over the R groups: balanced causal work for the ring. Documents mask
// every block as in ring attention and Ulysses.
// Degrees: U must divide P, and the heads as Ulysses needs on U ranks (U divides H, and U divides G or H/U divides
// H/G). U = 1 is ring attention and U = P is Ulysses, bit for bit: the same kernels on the same blocks.
// Communication per rank, forward: two all-to-alls inside the group (as Ulysses on U ranks: fast links), and R - 1 ring
// messages across groups, each the group's K/V for this rank's heads (U C tokens x G/U kv heads: the bytes of a ring
// message of C tokens x G heads). Ring attention sends P - 1 such messages, some between hosts; with one group per host
// USP's R - 1 all cross, but there are fewer of them, and Ulysses' all-to-alls stay inside the hosts: on 2 hosts of 2
// ranks, 0.67x the bytes ring attention sends between hosts and 0.50x Ulysses' (`AttentionRunReport.crossHostBytes`).
// Precision: as Ulysses for the all-to-alls (q, k, v, o, dO in bf16 in a bf16 run; lse and gradients fp32) and as ring
// attention for the ring (K/V blocks bf16, dK/dV accumulators fp32).

public struct USPAttention: AttentionAlgorithm {
    /// How the ring's exchange progresses (as ring attention's).
    public var progress: RingProgress
    public init(progress: RingProgress = .standard) { self.progress = progress }

    /// Throws when `degree` cannot split `ranks` ranks and the heads of `shape`, naming the degrees that work.
    public static func validate(degree: Int, ranks: Int, shape: AttentionShape) throws {
        let works = divisors(ranks).filter { u in (try? UlyssesAttention.HeadSplit.validate(ranks: u, shape: shape)) != nil }
        let advice = "degrees that work with \(ranks) ranks and --heads \(shape.heads) --kv-heads \(shape.kvHeads): \(works.map(String.init).joined(separator: ", ")) (1 is ring attention, \(ranks) is Ulysses)"
        guard degree >= 1, ranks % degree == 0 else {
            throw SeqParError.invalidInput("--ulysses-degree \(degree) must divide the \(ranks) ranks (a grid of degree x ranks/degree); \(advice)")
        }
        guard works.contains(degree) else {
            throw SeqParError.invalidInput("--ulysses-degree \(degree) gives each rank of a Ulysses group heads/\(degree) query heads, which --heads \(shape.heads) with --kv-heads \(shape.kvHeads) cannot split that way (the degree must divide the heads, and the kv heads or heads/degree must divide heads/kv-heads); \(advice)")
        }
    }

    /// This rank's place in the grid: its two sub-communicators, and the positions of every group (the ring's blocks)
    /// and of each member's tokens within its group's rows.
    struct Grid<C: Communicator> {
        let ulysses: C, ring: C
        let groups: [[Int]]
        let headRows: [[Int]]
        let split: UlyssesAttention.HeadSplit

        init(_ x: LocalAttention, degree u: Int, comm: C) throws {
            let (rank, ranks, layout, length) = (comm.rank, comm.size, x.options.partition, x.shape.seqLen)
            let g = rank / u
            ulysses = try comm.split(color: g, key: rank % u)
            ring = try comm.split(color: rank % u, key: g)
            let positions = (0..<ranks).map { layout.positions(rank: $0, ranks: ranks, length: length) }
            groups = (0..<(ranks / u)).map { g in positions[(g * u)..<((g + 1) * u)].flatMap { $0 }.sorted() }
            var row: [Int: Int] = [:]
            for (i, p) in groups[g].enumerated() { row[p] = i }
            headRows = (0..<u).map { j in positions[g * u + j].map { row[$0]! } }
            split = UlyssesAttention.HeadSplit(ranks: u, shape: x.shape)
        }

        /// The group's problem on this rank's heads: its q, k, v (and more) over the group's tokens.
        func local(_ x: LocalAttention, q: Tensor, k: Tensor, v: Tensor) -> LocalAttention {
            LocalAttention(shape: split.localShape(x.shape), options: x.options, positions: groups[ring.rank], q: q, k: k, v: v)
        }

        func exchange(_ parts: [UlyssesAttention.Part], toHeads: Bool, outputs: [Tensor], add: Bool = false, _ x: LocalAttention) throws {
            try UlyssesAttention.exchange(parts, toHeads: toHeads, outputs: outputs, add: add, headRows: headRows, tokens: x.tokens,
                                          batch: x.shape.batch, comm: ulysses)
        }
    }

    /// The grid of `x.options.ulyssesDegree` (checked; oneDNN loaded for bf16) on `comm`: a collective (two splits).
    static func grid<C: Communicator>(_ x: LocalAttention, comm: C) throws -> Grid<C> {
        let degree = x.options.ulyssesDegree ?? 1
        try validate(degree: degree, ranks: comm.size, shape: x.shape)
        if x.options.precision == .bf16 { try OneDNN.require() }
        return try Grid(x, degree: degree, comm: comm)
    }

    public func forward(_ x: LocalAttention, comm: some Communicator) throws -> AttentionOutput {
        let grid = try Self.grid(x, comm: comm)
        let bf16 = x.options.precision == .bf16
        let local = grid.split.localShape(x.shape), n = grid.groups[grid.ring.rank].count
        let q = Tensor(zeros: local.qShape(tokens: n)), k = Tensor(zeros: local.kvShape(tokens: n)), v = Tensor(zeros: k.shape)
        let split = grid.split
        try grid.exchange([.init(tensor: x.q, heads: split.queryHeads, bf16: bf16), .init(tensor: x.k, heads: split.kvHeads, bf16: bf16),
                           .init(tensor: x.v, heads: split.kvHeads, bf16: bf16)], toHeads: true, outputs: [q, k, v], x)
        let result = try RingAttention(progress: progress).forward(grid.local(x, q: q, k: k, v: v), blocks: { grid.groups[$0] }, comm: grid.ring)
        let o = Tensor(zeros: x.q.shape), lseRows = Tensor(zeros: [x.shape.batch, x.tokens, x.shape.heads, 1])
        try grid.exchange([.init(tensor: result.o, heads: split.queryHeads, bf16: bf16), .init(tensor: UlyssesAttention.lseAsRows(result.lse), heads: split.queryHeads)],
                          toHeads: false, outputs: [o, lseRows], x)
        return AttentionOutput(o: o, lse: UlyssesAttention.lseFromRows(lseRows))
    }

    public func backward(_ x: LocalAttention, output: AttentionOutput, gradOut: Tensor, comm: some Communicator) throws -> AttentionGradients {
        let grid = try Self.grid(x, comm: comm)
        let bf16 = x.options.precision == .bf16
        let local = grid.split.localShape(x.shape), n = grid.groups[grid.ring.rank].count
        let q = Tensor(zeros: local.qShape(tokens: n)), k = Tensor(zeros: local.kvShape(tokens: n)), v = Tensor(zeros: k.shape)
        let o = Tensor(zeros: q.shape), dO = Tensor(zeros: q.shape), lseRows = Tensor(zeros: [x.shape.batch, n, local.heads, 1])
        let split = grid.split
        try grid.exchange([.init(tensor: x.q, heads: split.queryHeads, bf16: bf16), .init(tensor: x.k, heads: split.kvHeads, bf16: bf16),
                           .init(tensor: x.v, heads: split.kvHeads, bf16: bf16), .init(tensor: output.o, heads: split.queryHeads, bf16: bf16),
                           .init(tensor: gradOut, heads: split.queryHeads, bf16: bf16), .init(tensor: UlyssesAttention.lseAsRows(output.lse), heads: split.queryHeads)],
                          toHeads: true, outputs: [q, k, v, o, dO, lseRows], x)
        let g = try RingAttention(progress: progress).backward(grid.local(x, q: q, k: k, v: v), blocks: { grid.groups[$0] },
                                                               output: AttentionOutput(o: o, lse: UlyssesAttention.lseFromRows(lseRows)), gradOut: dO, comm: grid.ring)
        let dq = Tensor(zeros: x.q.shape), dk = Tensor(zeros: x.k.shape), dv = Tensor(zeros: x.v.shape)
        try grid.exchange([.init(tensor: g.dq, heads: split.queryHeads), .init(tensor: g.dk, heads: split.kvHeads), .init(tensor: g.dv, heads: split.kvHeads)],
                          toHeads: false, outputs: [dq, dk, dv], add: true, x)
        return AttentionGradients(dq: dq, dk: dk, dv: dv)
    }
}
