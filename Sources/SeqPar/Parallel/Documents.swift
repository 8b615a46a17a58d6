// Packed documents: one sequence of L tokens holding several documents back to back, as long-context training packs
// them (flash-attn's varlen `cu_seqlens`, Transformer Engine's THD). Attention never crosses a document boundary: a
// query sees keys of its own document only (causal within it with --causal), and linear attention restarts its state
// at each document start.
//
// `offsets` are flash-attn's cu_seqlens: 0 = s_0 < s_1 < ... < s_n = L, document d holding tokens [s_d, s_(d+1)).
// The same documents apply to every batch row. No documents (nil where an option is optional) is one document of L
// tokens: the unmasked behaviour, bit for bit.
//
// Masks from documents stay ranges: for ascending key positions, the keys a query at position p sees are one run of
// indices, [first key at or after the start of p's document, first key after p (causal) or at or after its end).
// The kernels take those runs (`KeyWindows`), so tiles entirely across a boundary cost nothing.

public struct Documents: Sendable, Equatable, Codable, CustomStringConvertible {
    /// cu_seqlens: 0, then each document's end, ascending strictly, the last equal to the sequence length.
    public let offsets: [Int]

    /// From document lengths (`--doc-lens 301,7,450`), which must be positive and sum to `seqLen`.
    public init(lengths: [Int], seqLen: Int) throws {
        guard !lengths.isEmpty else {
            throw SeqParError.invalidInput("--doc-lens is empty: give the documents' lengths, comma-separated, summing to the sequence length \(seqLen) (e.g. --doc-lens \(seqLen))")
        }
        if let i = lengths.firstIndex(where: { $0 < 1 }) {
            throw SeqParError.invalidInput("--doc-lens \(Documents.list(lengths)): document \(i) has length \(lengths[i]); every document needs at least one token: drop it or merge it with a neighbour")
        }
        let total = lengths.reduce(0, +)
        guard total == seqLen else {
            throw SeqParError.invalidInput("--doc-lens \(Documents.list(lengths)) sums to \(total), the sequence length is \(seqLen): the documents must cover the sequence exactly, \(total < seqLen ? "add a document of \(seqLen - total) tokens" : "shorten them by \(total - seqLen) tokens") or set --seq-len \(total)")
        }
        var offsets = [0]
        for n in lengths { offsets.append(offsets.last! + n) }
        self.offsets = offsets
    }

    /// From flash-attn's cu_seqlens (`--cu-seqlens F.npy`): 0 first, strictly ascending, `seqLen` last.
    public init(cuSeqlens offsets: [Int], seqLen: Int, source: String = "--cu-seqlens") throws {
        let shown = Documents.list(offsets)
        guard offsets.count >= 2 else {
            throw SeqParError.invalidInput("\(source) holds \(offsets.count) offset\(offsets.count == 1 ? "" : "s") (\(shown)); cu_seqlens needs at least two: 0, then each document's end, the last \(seqLen) (e.g. [0, \(seqLen)] for one document)")
        }
        guard offsets.first == 0 else {
            throw SeqParError.invalidInput("\(source) (\(shown)) starts at \(offsets[0]); cu_seqlens starts at 0, the first document's start")
        }
        if let i = offsets.indices.dropFirst().first(where: { offsets[$0] <= offsets[$0 - 1] }) {
            throw SeqParError.invalidInput("\(source) (\(shown)) is not strictly ascending at index \(i) (\(offsets[i - 1]) then \(offsets[i])): each offset is a document's end, every document at least one token long; sort them and drop repeats")
        }
        guard offsets.last == seqLen else {
            throw SeqParError.invalidInput("\(source) (\(shown)) ends at \(offsets.last!), the sequence length is \(seqLen): the last offset must be the sequence length (out-of-range offsets are not allowed), or set --seq-len \(offsets.last!)")
        }
        self.offsets = offsets
    }

    /// One document of `seqLen` tokens.
    public init(single seqLen: Int) { offsets = [0, seqLen] }

    public var count: Int { offsets.count - 1 }
    public var seqLen: Int { offsets.last! }
    public var lengths: [Int] { zip(offsets, offsets.dropFirst()).map { $1 - $0 } }
    public var description: String { "\(count) document\(count == 1 ? "" : "s") (\(Documents.list(lengths)))" }

    /// The index of the document holding position `p`.
    public func index(of p: Int) -> Int {
        var lo = 0, hi = offsets.count - 1  // last offset <= p
        while hi - lo > 1 { let mid = (lo + hi) / 2; if offsets[mid] <= p { lo = mid } else { hi = mid } }
        return lo
    }

    /// The tokens of the document holding position `p`.
    public func range(of p: Int) -> Range<Int> {
        let d = index(of: p)
        return offsets[d]..<offsets[d + 1]
    }

    /// A list for messages: every value up to 12, then the first and last few.
    static func list(_ values: [Int]) -> String {
        values.count <= 12 ? values.map(String.init).joined(separator: ",")
            : (values.prefix(6).map(String.init) + ["... (\(values.count) in all)"] + values.suffix(3).map(String.init)).joined(separator: ",")
    }
}

/// The keys each query row of a block sees, as runs of key indices: row i sees keys `lower[i] ..< upper[i]` (empty
/// when upper <= lower). For ascending query and key positions both bounds ascend with the row.
public struct KeyWindows: Sendable, Equatable {
    public var lower: [Int]
    public var upper: [Int]

    /// The windows of queries at `qPositions` over keys at `kPositions` (both ascending): every key without mask; with
    /// `causal`, keys at positions <= the query's; with `documents`, keys of the query's document only.
    public init(queries qPositions: [Int], keys kPositions: [Int], causal: Bool, documents: Documents? = nil) {
        /// The first key index whose position is >= p (or > p with `after`).
        func firstKey(_ p: Int, after: Bool) -> Int {
            var lo = 0, hi = kPositions.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if kPositions[mid] < p || (after && kPositions[mid] == p) { lo = mid + 1 } else { hi = mid }
            }
            return lo
        }
        let ck = kPositions.count
        guard let documents, documents.count > 1 else {
            lower = Array(repeating: 0, count: qPositions.count)
            upper = causal ? qPositions.map { firstKey($0, after: true) } : Array(repeating: ck, count: qPositions.count)
            return
        }
        var lower: [Int] = [], upper: [Int] = []
        lower.reserveCapacity(qPositions.count)
        upper.reserveCapacity(qPositions.count)
        var document: Range<Int>? = nil
        var (lo, end) = (0, 0)
        for p in qPositions {
            if document.map({ !$0.contains(p) }) ?? true {
                let d = documents.range(of: p)
                (document, lo, end) = (d, firstKey(d.lowerBound, after: false), firstKey(d.upperBound, after: false))
            }
            lower.append(lo)
            upper.append(causal ? min(firstKey(p, after: true), end) : end)
        }
        (self.lower, self.upper) = (lower, upper)
    }

    /// `rows` rows that each see all `keys` keys (no mask).
    public init(rows: Int, allOf keys: Int) {
        lower = Array(repeating: 0, count: rows)
        upper = Array(repeating: keys, count: rows)
    }

    public var count: Int { lower.count }
    /// Keys row `i` sees.
    @inline(__always) public func width(_ i: Int) -> Int { max(upper[i] - lower[i], 0) }
    /// True when no row sees a key: a block to skip.
    public var isEmpty: Bool { !zip(lower, upper).contains { $0 < $1 } }
    /// Query-key pairs that are computed (the block's work).
    public var pairs: Int { (0..<count).reduce(0) { $0 + width($1) } }
}
