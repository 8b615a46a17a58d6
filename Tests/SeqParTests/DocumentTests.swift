// Packed documents: the document list and its checks, the key windows and the oracle's mask against their
// definitions, zigzag per document, tile and block skipping, and every softmax algorithm with documents against the
// Double oracle at 1-4 ranks (8 once), forward and backward: documents shorter than a chunk, longer than several
// chunks, a boundary exactly at a chunk edge, a document of one token, GQA, both layouts, causal and not, bf16.
import Foundation
import Testing
@testable import SeqPar

@Suite struct DocumentTests {
    // MARK: the document list

    @Test func lengthsAndOffsets() throws {
        let d = try Documents(lengths: [301, 7, 450, 1, 243], seqLen: 1002)
        #expect(d.offsets == [0, 301, 308, 758, 759, 1002])
        #expect(d.lengths == [301, 7, 450, 1, 243] && d.count == 5 && d.seqLen == 1002)
        #expect(try Documents(cuSeqlens: d.offsets, seqLen: 1002) == d)
        #expect(d.index(of: 0) == 0 && d.index(of: 300) == 0 && d.index(of: 301) == 1 && d.index(of: 758) == 3 && d.index(of: 1001) == 4)
        #expect(d.range(of: 305) == 301..<308)
    }

    /// Each bad list is refused naming the list and the fix.
    @Test func badDocumentListsAreRefused() {
        for (lengths, expected) in [([10, 20], "sums to 30, the sequence length is 40"), ([10, 0, 30], "document 1 has length 0"),
                                    ([50, -10], "document 1 has length -10"), ([], "--doc-lens is empty")] {
            #expect { try Documents(lengths: lengths, seqLen: 40) } throws: { "\($0)".contains(expected) && "\($0)".contains("--") }
        }
        for (offsets, expected) in [([0, 30, 20, 40], "not strictly ascending at index 2 (30 then 20)"), ([0, 20, 20, 40], "not strictly ascending"),
                                    ([5, 40], "starts at 5"), ([0, 20, 50], "ends at 50, the sequence length is 40"),
                                    ([0, 20, 30], "ends at 30"), ([40], "holds 1 offset")] {
            #expect { try Documents(cuSeqlens: offsets, seqLen: 40) } throws: { "\($0)".contains(expected) }
        }
    }

    /// cu_seqlens from .npy: int32 and int64 read; floats and 2-D arrays refused naming the dtype or shape and the fix.
    @Test func cuSeqlensFiles() throws {
        func file(_ descr: String, _ shape: String, _ data: [UInt8]) -> [UInt8] { npyBytes("{'descr': '\(descr)', 'fortran_order': False, 'shape': \(shape), }", data: data) }
        let offsets = [0, 3, 10]
        let i32 = offsets.flatMap { withUnsafeBytes(of: Int32($0).littleEndian, Array.init) }
        let i64 = offsets.flatMap { withUnsafeBytes(of: Int64($0).littleEndian, Array.init) }
        #expect(try NPY.decodeIntegers(file("<i4", "(3,)", i32), file: "cu.npy") == offsets)
        #expect(try NPY.decodeIntegers(file("<i8", "(3,)", i64), file: "cu.npy") == offsets)
        #expect { try NPY.decodeIntegers(file("<f4", "(3,)", i32), file: "cu.npy") } throws: { "\($0)".contains("'<f4' is not int32 or int64") }
        #expect { try NPY.decodeIntegers(file("<i4", "(1, 3)", i32), file: "cu.npy") } throws: { "\($0)".contains("one-dimensional") }
        #expect { try NPY.decodeIntegers(file("<i8", "(3,)", i32), file: "cu.npy") } throws: { "\($0)".contains("truncated") }
        // Through a run: the file is read on every rank, checked against the sequence length, and errors on every rank.
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("seqpar-docs-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let good = dir.appendingPathComponent("cu.npy").path, bad = dir.appendingPathComponent("bad.npy").path
        try Data(file("<i8", "(3,)", i64)).write(to: URL(fileURLWithPath: good))
        try Data(file("<f4", "(3,)", i32)).write(to: URL(fileURLWithPath: bad))
        for (path, seqLen, expected) in [(good, 10, nil), (good, 12, "ends at 10, the sequence length is 12"), (bad, 10, "not int32 or int64")] {
            let results = try InProcessCluster.run(ranks: 2) { comm -> String in
                var config = AttentionRunConfig(algorithm: .ring, shape: AttentionShape(seqLen: seqLen, heads: 2, headDim: 8), options: AttentionOptions(causal: true))
                config.cuSeqlensPath = path
                config.check = true
                do { let r = try AttentionRun.execute(config, comm: comm, backend: "test"); return "docs \(r.documents ?? 0) \(r.check!.passed)" } catch { return "\(error)" }
            }
            for r in results { #expect(r.contains(expected ?? "docs 2 true"), "\(r)") }
        }
    }

    // MARK: masks

    /// Key windows equal the definition (same document, and key <= query when causal) on random ascending subsets.
    @Test func keyWindowsMatchTheDefinition() throws {
        var rng = SystemRandomNumberGenerator()
        for trial in 0..<200 {
            let length = Int.random(in: 1...60, using: &rng)
            var cuts = Set<Int>()
            for _ in 0..<Int.random(in: 0...6, using: &rng) where length > 1 { cuts.insert(Int.random(in: 1..<length, using: &rng)) }
            let docs = try Documents(cuSeqlens: [0] + cuts.sorted() + [length], seqLen: length)
            let queries = (0..<length).filter { _ in Bool.random(using: &rng) }, keys = (0..<length).filter { _ in Bool.random(using: &rng) }
            for causal in [false, true] {
                let w = KeyWindows(queries: queries, keys: keys, causal: causal, documents: docs)
                for (i, p) in queries.enumerated() {
                    let expected = keys.indices.filter { docs.index(of: keys[$0]) == docs.index(of: p) && (!causal || keys[$0] <= p) }
                    let got = Array(w.lower[i]..<max(w.upper[i], w.lower[i]))
                    #expect(got == expected, "trial \(trial) causal \(causal) query \(p): \(got) vs \(expected)")
                }
            }
        }
    }

    /// The oracle with documents is the oracle run on each document alone, concatenated.
    @Test func oracleMaskIsPerDocumentAttention() throws {
        let s = AttentionShape(batch: 2, seqLen: 23, heads: 2, kvHeads: 1, headDim: 8)
        let docs = try Documents(lengths: [9, 1, 13], seqLen: 23)
        let g = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: Array(0..<23), seed: 3)
        let dO = SeededInputs.gradOut(shape: s, positions: Array(0..<23), seed: 3)
        for causal in [false, true] {
            let packed = DenseOracle.forward(q: g.q, k: g.k, v: g.v, causal: causal, documents: docs, scale: 0.3)
            let packedG = DenseOracle.backward(q: g.q, k: g.k, v: g.v, gradOut: dO, causal: causal, documents: docs, scale: 0.3)
            for (d, start) in docs.offsets.dropLast().enumerated() {
                let rows = Array(start..<docs.offsets[d + 1])
                func cut(_ t: Tensor) -> Tensor { SequenceLayoutTestHelper.rows(t, rows) }
                let alone = DenseOracle.forward(q: cut(g.q), k: cut(g.k), v: cut(g.v), causal: causal, scale: 0.3)
                let aloneG = DenseOracle.backward(q: cut(g.q), k: cut(g.k), v: cut(g.v), gradOut: cut(dO), causal: causal, scale: 0.3)
                for (full, part, row) in [(packed.o, alone.o, 16), (packedG.dq, aloneG.dq, 16), (packedG.dk, aloneG.dk, 8), (packedG.dv, aloneG.dv, 8)] {
                    let mine = rowsAt(full, batch: 2, length: 23, row: row, positions: rows)
                    #expect(zip(mine, part).allSatisfy { abs($0 - $1) <= 1e-12 * max(1, abs($1)) }, "document \(d) causal \(causal)")
                }
            }
        }
    }

    // MARK: layout

    /// Zigzag per document: every token on exactly one rank, ascending, each rank holding its two chunks of every long
    /// document; causal work balanced (slowest rank over mean) where zigzag over the packed sequence is not.
    @Test func zigzagSplitsEachDocument() throws {
        let lengths = [3000, 40, 1, 700, 5, 1800, 17, 2600]
        let docs = try Documents(lengths: lengths, seqLen: lengths.reduce(0, +))
        for ranks in [1, 2, 3, 4, 8] {
            let perDocument = Partition(layout: .zigzag, documents: docs), packed = Partition(layout: .zigzag)
            let positions = (0..<ranks).map { perDocument.positions(rank: $0, ranks: ranks, length: docs.seqLen) }
            #expect(positions.allSatisfy { zip($0, $0.dropFirst()).allSatisfy { $0 < $1 } })
            #expect(positions.flatMap { $0 }.sorted() == Array(0..<docs.seqLen))
            for (d, start) in docs.offsets.dropLast().enumerated() where lengths[d] >= 2 * ranks {
                let counts = positions.map { $0.filter { (start..<docs.offsets[d + 1]).contains($0) }.count }
                #expect(counts.max()! - counts.min()! <= 2, "document \(d): \(counts)")
            }
            func imbalance(_ p: Partition) -> Double {
                let work = (0..<ranks).map { r in
                    Double(KeyWindows(queries: p.positions(rank: r, ranks: ranks, length: docs.seqLen), keys: Array(0..<docs.seqLen), causal: true, documents: docs).pairs)
                }
                return work.max()! / (work.reduce(0, +) / Double(ranks))
            }
            #expect(imbalance(perDocument) < 1.01, "P=\(ranks): \(imbalance(perDocument))")
            if ranks > 2 { #expect(imbalance(packed) > imbalance(perDocument)) }
        }
    }

    // MARK: skipping

    /// The forward multiplies only tiles its documents need: for documents a multiple of the tile size the score
    /// elements computed are the documents' own blocks (plus the diagonal tiles when causal), not L^2.
    @Test func tilesAcrossBoundariesAreSkipped() throws {
        let tile = SoftmaxAttention.tileRows
        let lengths = [4 * tile, tile, 2 * tile, tile]
        let length = lengths.reduce(0, +)
        let docs = try Documents(lengths: lengths, seqLen: length)
        let s = AttentionShape(seqLen: length, heads: 1, headDim: 16)
        let all = Array(0..<length)
        let x = SeededInputs.attention(shape: s, options: AttentionOptions(), positions: all, seed: 2)
        for precision in [Precision.fp32] + (OneDNN.isAvailable ? [.bf16] : []) {
            for causal in [false, true] {
                let p = KernelProfile.measure {
                    _ = SoftmaxAttention.forward(q: x.q, qPositions: all, k: x.k, v: x.v, kPositions: all, causal: causal, documents: docs, scale: 0.25, precision: precision)
                }
                // Non-causal: each document's n x n block exactly. Causal: its lower triangle of tiles, diagonal included.
                let expected = lengths.reduce(0) { sum, n in sum + (causal ? tile * tile * (n / tile) * (n / tile + 1) / 2 : n * n) }
                #expect(p.scoreElements == expected, "\(precision) causal \(causal): \(p.scoreElements) vs \(expected) (L^2 = \(length * length))")
            }
        }
    }

    /// Documents not aligned to tiles: a query tile stops at a document boundary, so without a mask each document's
    /// n x n block is all that is multiplied.
    @Test func queryTilesStopAtBoundaries() throws {
        let lengths = [100, 300, 1, 50, 149]
        let docs = try Documents(lengths: lengths, seqLen: 600)
        let all = Array(0..<600)
        let x = SeededInputs.attention(shape: AttentionShape(seqLen: 600, heads: 1, headDim: 16), options: AttentionOptions(), positions: all, seed: 2)
        let p = KernelProfile.measure {
            _ = SoftmaxAttention.forward(q: x.q, qPositions: all, k: x.k, v: x.v, kPositions: all, causal: false, documents: docs, scale: 0.25)
        }
        #expect(p.scoreElements == lengths.reduce(0) { $0 + $1 * $1 })
        let w = KeyWindows(queries: all, keys: all, causal: false, documents: docs)
        #expect(SoftmaxAttention.backwardShare(batch: 1, heads: 1, windows: w, work: 0..<1)[0].tiles.allSatisfy { t in
            docs.index(of: t.i0) == docs.index(of: t.i0 + t.rows - 1) })
    }

    /// A ring block whose keys no local query may see (other documents only) is skipped.
    @Test func ringSkipsBlocksOfOtherDocuments() throws {
        let docs = try Documents(lengths: [10, 10, 10], seqLen: 30)
        var options = AttentionOptions()
        options.documents = docs
        let s = AttentionShape(seqLen: 30, heads: 1, headDim: 4)
        let x = SeededInputs.attention(shape: s, options: options, positions: Array(10..<20), seed: 1)
        #expect(RingAttention.skips(x, keys: Array(0..<10)) && RingAttention.skips(x, keys: Array(20..<30)))
        #expect(!RingAttention.skips(x, keys: Array(5..<15)))
    }

    // MARK: algorithms

    /// Documents for a sequence of `length` over `ranks`: a boundary exactly at a chunk edge, a document of one
    /// token, documents shorter than a chunk and one longer than several chunks.
    static func documents(length: Int, ranks: Int) throws -> Documents {
        let chunk = length / ranks
        let cuts = Set([chunk, chunk + 1, chunk + 4, 5, length - 3]).filter { $0 > 0 && $0 < length }.sorted()
        return try Documents(cuSeqlens: [0] + cuts + [length], seqLen: length)
    }

    @Test(arguments: [1, 2, 3, 4], AlgorithmTests.distributed)
    func distributedMatchesOracle(ranks: Int, algorithm: AlgorithmName) throws {
        let shape = AlgorithmTests.gqaShape(algorithm, ranks: ranks, seqLen: 61)
        for causal in [false, true] {
            for layout in SequenceLayout.allCases {
                try checkAttention(AttentionCase(algorithm: algorithm, ranks: ranks, shape: shape, causal: causal, layout: layout,
                                                 documents: try Self.documents(length: 61, ranks: ranks)))
            }
        }
    }

    @Test(arguments: [AlgorithmName.allgather, .ring, .rsa, .ulysses])
    func eightRanksAndBatchTwo(algorithm: AlgorithmName) throws {
        var shape = AlgorithmTests.gqaShape(algorithm, ranks: 8, seqLen: 75)
        shape.batch = 2
        try checkAttention(AttentionCase(algorithm: algorithm, ranks: 8, shape: shape, causal: true, layout: .zigzag,
                                         documents: try Documents(lengths: [1, 30, 16, 2, 26], seqLen: 75)))
    }

    /// Packed documents in groups, each group its own ring (`RingAttention.groupShare`): against the oracle at 2-4
    /// ranks, both layouts, causal and not, GQA; the groups do form (several rings) where every rank holds enough of
    /// each, and the result is bit for bit that of one ring over the whole sequence (the kernels' tiles start at each
    /// document's first query and key either way), in fp32 and bf16.
    @Test(arguments: [2, 3, 4])
    func ringInDocumentGroups(ranks: Int) throws {
        let lengths = [100, 7, 1, 92, 60, 40]
        let docs = try Documents(lengths: lengths, seqLen: 300)
        let shape = AttentionShape(seqLen: 300, heads: 4, kvHeads: 2, headDim: 16)
        for layout in SequenceLayout.allCases {
            var options = AttentionOptions(causal: true, layout: layout)
            options.documents = docs
            let x = SeededInputs.attention(shape: shape, options: options, positions: options.partition.positions(rank: 0, ranks: ranks, length: 300), seed: 3)
            let groups = RingAttention(groupShare: 8).documentGroups(x, blocks: RingAttention.partitionPositions(x, ranks: ranks), ranks: ranks)
            if layout == .zigzag { #expect((groups?.count ?? 1) >= 3, "P=\(ranks): \(groups?.map(\.rows) ?? [])") }
            for causal in [false, true] {
                try checkAttention(AttentionCase(algorithm: .ring, ranks: ranks, shape: shape, causal: causal, layout: layout, ringGroupShare: 8, documents: docs))
            }
            for precision in [Precision.fp32] + (OneDNN.isAvailable ? [.bf16] : []) {
                options.precision = precision
                let grouped = try runOnCluster(RingAttention(groupShare: 8), ranks: ranks, shape: shape, options: options, seed: 5)
                let one = try runOnCluster(RingAttention(groupShare: 0), ranks: ranks, shape: shape, options: options, seed: 5)
                for (a, b) in zip(grouped, one) {
                    #expect(a.o.toArray() == b.o.toArray() && a.lse.toArray() == b.lse.toArray() && a.grads.dq.toArray() == b.grads.dq.toArray() &&
                            a.grads.dk.toArray() == b.grads.dk.toArray() && a.grads.dv.toArray() == b.grads.dv.toArray(), "P=\(ranks) \(layout) \(precision)")
                }
            }
        }
    }

    /// One document (`Documents(single:)`) gives exactly the bits of no documents.
    @Test(arguments: [AlgorithmName.ring, .allgather])
    func oneDocumentIsTheUnmaskedRun(algorithm: AlgorithmName) throws {
        let s = AttentionShape(seqLen: 50, heads: 4, kvHeads: 2, headDim: 16)
        for layout in SequenceLayout.allCases {
            var plain = AttentionOptions(causal: true, layout: layout)
            var single = plain
            single.documents = Documents(single: 50)
            for precision in [Precision.fp32] + (OneDNN.isAvailable ? [.bf16] : []) {
                (plain.precision, single.precision) = (precision, precision)
                let a = try runOnCluster(algorithm.implementation, ranks: 3, shape: s, options: plain, seed: 4)
                let b = try runOnCluster(algorithm.implementation, ranks: 3, shape: s, options: single, seed: 4)
                for (x, y) in zip(a, b) {
                    #expect(x.o.toArray() == y.o.toArray() && x.grads.dq.toArray() == y.grads.dq.toArray() &&
                            x.grads.dk.toArray() == y.grads.dk.toArray() && x.grads.dv.toArray() == y.grads.dv.toArray(), "\(algorithm) \(layout) \(precision)")
                }
            }
        }
    }

    /// bf16 with documents, through a whole run: the bf16 rule against the Double oracle with the same mask.
    @Test(.enabled(if: OneDNN.isAvailable, "oneDNN (libdnnl) is not installed"), arguments: AlgorithmTests.distributed)
    func bf16RuleWithDocuments(algorithm: AlgorithmName) throws {
        let reports = try InProcessCluster.run(ranks: 2) { comm -> AttentionRunReport in
            var config = AttentionRunConfig(algorithm: algorithm, shape: AttentionShape(seqLen: 200, heads: 4, kvHeads: 2, headDim: 32),
                                            options: AttentionOptions(causal: true, layout: .zigzag))
            config.options.precision = .bf16
            config.documentLengths = [70, 1, 99, 30]
            (config.backward, config.check) = (true, true)
            return try AttentionRun.execute(config, comm: comm, backend: "test")
        }
        let c = try #require(reports[0].check)
        #expect(c.passed && c.plainBF16ForwardError != nil && reports[0].documents == 4, "\(c)")
    }

    /// Documents that do not fit the run are refused on every rank before any work.
    @Test func mismatchedDocumentsAreRefusedOnEveryRank() throws {
        let errors = try InProcessCluster.run(ranks: 3) { comm -> String in
            var config = AttentionRunConfig(algorithm: .ring, shape: AttentionShape(seqLen: 100, heads: 2, headDim: 8), options: AttentionOptions(causal: true))
            config.documentLengths = [50, 60]
            do { _ = try AttentionRun.execute(config, comm: comm, backend: "test"); return "no error" } catch { return "\(error)" }
        }
        for e in errors { #expect(e.contains("--doc-lens 50,60 sums to 110, the sequence length is 100"), "\(e)") }
        var options = AttentionOptions()
        options.documents = try Documents(lengths: [10, 10], seqLen: 20)
        #expect { try AlgorithmName.ring.validate(ranks: 2, shape: AttentionShape(seqLen: 30, heads: 2, headDim: 8), options: options) }
            throws: { "\($0)".contains("cover 20 tokens") }
    }
}
