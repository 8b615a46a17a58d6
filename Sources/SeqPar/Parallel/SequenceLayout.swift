// How a sequence of L tokens is spread over P ranks, and moving tensors between global and per-rank order.
//
//   contiguous  rank r holds tokens [r*L/P, (r+1)*L/P)
//   zigzag      the sequence is cut in 2P chunks; rank r holds chunks r and 2P-1-r, which balances causal work
//
// Lengths that do not divide: the first parts get one token more (L = 10, P = 4: 3 3 2 2). With L < P (or L < 2P
// for zigzag) some ranks hold no tokens. A rank's positions are always ascending.
// Shares (`Partition.shares`, e.g. from `SpeedBalance`): rank r's parts get tokens in proportion to shares[r] instead
// of equally (zigzag: both of its chunks), rounded by largest remainder (ties to the lower part), so equal shares give
// the equal split above. The work a rank does grows with its tokens under zigzag, contiguous without a mask, and the
// linear algorithms: shares in proportion to the ranks' speeds let a faster rank take more of it.
// Packed documents (`Partition.documents`): zigzag applies per document, as ring-flash-attention's varlen zigzag does:
// each document is cut in 2P chunks and rank r holds chunks r and 2P-1-r of every document, so the causal work of
// every document, long or short, is balanced over the ranks (zigzag over the packed sequence would balance only a
// single document's triangle). A document shorter than 2P tokens leaves some chunks empty; its tokens go to the
// lower chunks, rotated by the document's index so that short documents spread over the ranks. Contiguous ignores
// documents (it splits the packed sequence).
// Tensors here are (batch, seq, ...): the layout splits axis 1 and keeps the batch axis whole on every rank.

public enum SequenceLayout: String, CaseIterable, Sendable, Codable {
    case contiguous, zigzag

    /// `length` split into `parts` ranges, the first `length % parts` one longer.
    public static func split(_ length: Int, into parts: Int) -> [Range<Int>] {
        let base = length / parts, extra = length % parts
        var ranges: [Range<Int>] = []
        var start = 0
        for i in 0..<parts {
            let n = base + (i < extra ? 1 : 0)
            ranges.append(start..<(start + n))
            start += n
        }
        return ranges
    }

    /// `length` split into parts in proportion to `weights` (all positive): floor of each part's exact size, then one
    /// more token to the parts with the largest remainders (the lower part first on a tie).
    public static func split(_ length: Int, weights: [Double]) -> [Range<Int>] {
        let top = weights.max() ?? 1  // over the largest first, so huge weights cannot overflow the sum
        let total = weights.reduce(0) { $0 + $1 / top }
        let exact = weights.map { Double(length) * ($0 / top) / total }
        var sizes = exact.map { Int($0.rounded(.down)) }
        let order = sizes.indices.sorted { (exact[$0] - Double(sizes[$0]), -$0) > (exact[$1] - Double(sizes[$1]), -$1) }
        for i in order.prefix(length - sizes.reduce(0, +)) { sizes[i] += 1 }
        var start = 0
        return sizes.map { n in defer { start += n }; return start..<(start + n) }
    }

    /// This layout with equal shares.
    public var equal: Partition { Partition(layout: self) }
    public func ranges(rank: Int, ranks: Int, length: Int) -> [Range<Int>] { equal.ranges(rank: rank, ranks: ranks, length: length) }
    public func positions(rank: Int, ranks: Int, length: Int) -> [Int] { equal.positions(rank: rank, ranks: ranks, length: length) }
    public func counts(ranks: Int, length: Int) -> [Int] { equal.counts(ranks: ranks, length: length) }
    public func scatter(_ global: Tensor, rank: Int, ranks: Int) -> Tensor { equal.scatter(global, rank: rank, ranks: ranks) }
    public func gather(_ local: Tensor, length: Int, comm: some Communicator, as precision: Precision = .fp32) throws -> Tensor {
        try equal.gather(local, length: length, comm: comm, as: precision)
    }
    public func reduceScatter(_ global: Tensor, comm: some Communicator) throws -> Tensor { try equal.reduceScatter(global, comm: comm) }
}

/// A layout and, optionally, each rank's share of the tokens (nil: equal) and the packed documents (zigzag splits each).
public struct Partition: Sendable, Equatable {
    public var layout: SequenceLayout
    public var shares: [Double]?
    public var documents: Documents?
    public init(layout: SequenceLayout, shares: [Double]? = nil, documents: Documents? = nil) {
        (self.layout, self.shares, self.documents) = (layout, shares, documents)
    }

    /// `length` in `parts` pieces, each owned by rank `owner(piece)`, sized by the owners' shares (or equally).
    func split(_ length: Int, parts: Int, ranks: Int, owner: (Int) -> Int) -> [Range<Int>] {
        guard let shares else { return SequenceLayout.split(length, into: parts) }
        precondition(shares.count == ranks, "\(shares.count) shares for \(ranks) ranks")
        return SequenceLayout.split(length, weights: (0..<parts).map { shares[owner($0)] })
    }

    /// The global token ranges rank `rank` holds, ascending.
    public func ranges(rank: Int, ranks: Int, length: Int) -> [Range<Int>] {
        switch layout {
        case .contiguous:
            return [split(length, parts: ranks, ranks: ranks) { $0 }[rank]]
        case .zigzag:
            let owner = { (c: Int) in c < ranks ? c : 2 * ranks - 1 - c }
            guard let documents, documents.count > 1 else {
                let chunks = split(length, parts: 2 * ranks, ranks: ranks, owner: owner)
                return [chunks[rank], chunks[2 * ranks - 1 - rank]]
            }
            precondition(documents.seqLen == length, "documents of \(documents.seqLen) tokens for a sequence of \(length)")
            var mine: [Range<Int>] = []
            for (d, start) in documents.offsets.dropLast().enumerated() {
                let n = documents.offsets[d + 1] - start
                // Rotating the chunks by d moves where a short document's remainder lands, not what each rank holds of
                // a long one (its chunks are equal but for one token).
                let shift = n < 2 * ranks ? d % (2 * ranks) : 0
                let chunks = split(n, parts: 2 * ranks, ranks: ranks) { owner(($0 + 2 * ranks - shift) % (2 * ranks)) }
                for c in [rank, 2 * ranks - 1 - rank].map({ ($0 + shift) % (2 * ranks) }).sorted() where !chunks[c].isEmpty {
                    mine.append((chunks[c].lowerBound + start)..<(chunks[c].upperBound + start))
                }
            }
            return mine
        }
    }

    /// Global positions of rank `rank`'s tokens, ascending.
    public func positions(rank: Int, ranks: Int, length: Int) -> [Int] {
        ranges(rank: rank, ranks: ranks, length: length).flatMap { Array($0) }
    }

    /// Number of tokens on each rank.
    public func counts(ranks: Int, length: Int) -> [Int] {
        (0..<ranks).map { r in ranges(rank: r, ranks: ranks, length: length).reduce(0) { $0 + $1.count } }
    }

    /// Rank `rank`'s part of a global (batch, L, ...) tensor, copied.
    public func scatter(_ global: Tensor, rank: Int, ranks: Int) -> Tensor {
        precondition(global.rank >= 2, "scatter needs a (batch, seq, ...) tensor")
        let (batch, length) = (global.shape[0], global.shape[1])
        let row = global.shape.dropFirst(2).reduce(1, *)
        let rs = ranges(rank: rank, ranks: ranks, length: length)
        let local = rs.reduce(0) { $0 + $1.count }
        var shape = global.shape
        shape[1] = local
        let out = Tensor(zeros: shape)
        for b in 0..<batch {
            var dst = out.pointer + b * local * row
            for r in rs {
                dst.update(from: global.pointer + (b * length + r.lowerBound) * row, count: r.count * row)
                dst += r.count * row
            }
        }
        return out
    }

    /// The global (batch, length, ...) tensor from every rank's part: one `allGatherV`, then reordering. With
    /// `precision` bf16 the parts travel as bf16 (half the bytes): each rank's values are rounded to bf16 first, and
    /// the result holds those bf16 values in fp32 (exact where the parts held bf16 values already).
    public func gather(_ local: Tensor, length: Int, comm: some Communicator, as precision: Precision = .fp32) throws -> Tensor {
        precondition(local.rank >= 2, "gather needs a (batch, seq, ...) tensor")
        let batch = local.shape[0]
        let row = local.shape.dropFirst(2).reduce(1, *)
        let counts = self.counts(ranks: comm.size, length: length)
        guard local.shape[1] == counts[comm.rank] else {
            throw SeqParError.invalidInput("rank \(comm.rank) holds \(local.shape[1]) tokens, the \(layout.rawValue) layout of \(length) over \(comm.size) ranks gives it \(counts[comm.rank])")
        }
        var shape = local.shape
        shape[1] = length
        let total = counts.reduce(0, +) * batch * row
        switch precision {
        case .fp32:
            let rankMajor = Tensor(zeros: [total])
            try comm.allGatherV(UnsafeBufferPointer(local.buffer), into: rankMajor.buffer, counts: counts.map { $0 * batch * row })
            let global = Tensor(zeros: shape)
            permute(rankMajor: rankMajor.pointer, global: global.pointer, batch: batch, length: length, row: row, ranks: comm.size, toGlobal: true)
            return global
        case .bf16:
            let mine = BF16Tensor(rounding: local), rankMajor = BF16Tensor(uninitialized: [total]), ordered = BF16Tensor(uninitialized: [total])
            try comm.allGatherV(UnsafeBufferPointer(mine.buffer), into: rankMajor.buffer, counts: counts.map { $0 * batch * row })
            permute(rankMajor: rankMajor.pointer, global: ordered.pointer, batch: batch, length: length, row: row, ranks: comm.size, toGlobal: true)
            return ordered.reshaped(shape).widened()
        }
    }

    /// The adjoint of `gather`: every rank holds a full (batch, length, ...) tensor of partial sums; returns this
    /// rank's part of their sum, through one `reduceScatter`.
    public func reduceScatter(_ global: Tensor, comm: some Communicator) throws -> Tensor {
        let (batch, length) = (global.shape[0], global.shape[1])
        let row = global.shape.dropFirst(2).reduce(1, *)
        let counts = self.counts(ranks: comm.size, length: length)
        let rankMajor = Tensor(zeros: [global.count])
        permute(rankMajor: rankMajor.pointer, global: global.pointer, batch: batch, length: length, row: row, ranks: comm.size, toGlobal: false)
        var shape = global.shape
        shape[1] = counts[comm.rank]
        let local = Tensor(zeros: shape)
        try comm.reduceScatter(UnsafeBufferPointer(rankMajor.buffer), into: local.buffer, counts: counts.map { $0 * batch * row }, op: .sum)
        return local
    }

    /// Copies between rank-major order (rank 0's (batch, C0, ...) block, then rank 1's ...) and global order.
    func permute<T>(rankMajor: UnsafeMutablePointer<T>, global: UnsafeMutablePointer<T>,
                 batch: Int, length: Int, row: Int, ranks: Int, toGlobal: Bool) {
        var offset = 0
        for r in 0..<ranks {
            let rs = ranges(rank: r, ranks: ranks, length: length)
            let local = rs.reduce(0) { $0 + $1.count }
            for b in 0..<batch {
                var src = rankMajor + offset + b * local * row
                for range in rs {
                    let g = global + (b * length + range.lowerBound) * row
                    if toGlobal { g.update(from: src, count: range.count * row) } else { src.update(from: g, count: range.count * row) }
                    src += range.count * row
                }
            }
            offset += batch * local * row
        }
    }
}
