// Layouts: positions by hand, partition properties, scatter/gather round trips and the reduce-scatter adjoint.
import PropertyBased
import Testing
@testable import SeqPar

@Suite struct SequenceLayoutTests {
    @Test func splitGivesTheFirstPartsOneMore() {
        #expect(SequenceLayout.split(10, into: 4) == [0..<3, 3..<6, 6..<8, 8..<10])
        #expect(SequenceLayout.split(2, into: 4) == [0..<1, 1..<2, 2..<2, 2..<2])
        #expect(SequenceLayout.split(8, into: 4).map(\.count) == [2, 2, 2, 2])
    }

    /// Shares: sizes in proportion, rounded by largest remainder (the lower part first on a tie), summing to L; equal
    /// shares give the equal split exactly; zigzag sizes both of a rank's chunks by its share.
    @Test func sharesSplitInProportion() {
        #expect(SequenceLayout.split(10, weights: [1, 3]) == [0..<3, 3..<10])          // 2.5 / 7.5: the tie to part 0
        #expect(SequenceLayout.split(10, weights: [1, 1, 1, 1]) == SequenceLayout.split(10, into: 4))
        #expect(SequenceLayout.split(7, weights: [0.001, 1, 1]).map(\.count) == [0, 4, 3])
        let contiguous = Partition(layout: .contiguous, shares: [2, 1, 1])
        #expect(contiguous.counts(ranks: 3, length: 100) == [50, 25, 25])
        #expect(contiguous.positions(rank: 1, ranks: 3, length: 100) == Array(50..<75))
        // zigzag, P = 2, shares 3 : 1 over L = 16: chunks 6 2 2 6; rank 0 holds chunks 0 and 3.
        let zigzag = Partition(layout: .zigzag, shares: [3, 1])
        #expect(zigzag.positions(rank: 0, ranks: 2, length: 16) == Array(0..<6) + Array(10..<16))
        #expect(zigzag.positions(rank: 1, ranks: 2, length: 16) == Array(6..<10))
        #expect(Partition(layout: .zigzag, shares: [1, 1, 1]).counts(ranks: 3, length: 20) == SequenceLayout.zigzag.counts(ranks: 3, length: 20))
    }

    @Test func sharedPositionsPartitionTheSequenceAndAscend() async {
        await propertyCheck(count: 200, input: Gen.int(in: 0...80), Gen.int(in: 1...6), Gen.bool, Gen.int(in: 1...1000)) { length, ranks, zig, seed in
            let shares = (0..<ranks).map { r in Double((seed * (r + 7)) % 97 + 1) / 10 }
            let part = Partition(layout: zig ? .zigzag : .contiguous, shares: shares)
            var seen: [Int] = []
            let counts = part.counts(ranks: ranks, length: length)
            for r in 0..<ranks {
                let p = part.positions(rank: r, ranks: ranks, length: length)
                #expect(p == p.sorted() && p.count == counts[r])
                seen += p
                // Within one token per chunk of the exact proportional share.
                let exact = Double(length) * shares[r] / shares.reduce(0, +)
                #expect(abs(Double(counts[r]) - exact) <= (zig ? 2 : 1))
            }
            #expect(seen.sorted() == Array(0..<length))
        }
    }

    @Test func positionsByHand() {
        // contiguous L = 10, P = 3: 4 3 3
        #expect(SequenceLayout.contiguous.positions(rank: 0, ranks: 3, length: 10) == [0, 1, 2, 3])
        #expect(SequenceLayout.contiguous.positions(rank: 2, ranks: 3, length: 10) == [7, 8, 9])
        // zigzag L = 10, P = 2: chunks of split(10, 4) = 3 3 2 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
        #expect(SequenceLayout.zigzag.positions(rank: 0, ranks: 2, length: 10) == [0, 1, 2, 8, 9])
        #expect(SequenceLayout.zigzag.positions(rank: 1, ranks: 2, length: 10) == [3, 4, 5, 6, 7])
        // zigzag L = 3, P = 2: chunks 1 1 1 0; rank 1 holds chunks 1 and 2.
        #expect(SequenceLayout.zigzag.positions(rank: 0, ranks: 2, length: 3) == [0])
        #expect(SequenceLayout.zigzag.positions(rank: 1, ranks: 2, length: 3) == [1, 2])
    }

    @Test func positionsPartitionTheSequenceAndAscend() async {
        await propertyCheck(count: 200, input: Gen.int(in: 0...50), Gen.int(in: 1...8), Gen.bool) { length, ranks, zig in
            let layout: SequenceLayout = zig ? .zigzag : .contiguous
            var seen: [Int] = []
            for r in 0..<ranks {
                let p = layout.positions(rank: r, ranks: ranks, length: length)
                #expect(p == p.sorted())
                #expect(p.count == layout.counts(ranks: ranks, length: length)[r])
                seen += p
            }
            #expect(seen.sorted() == Array(0..<length))
            let counts = layout.counts(ranks: ranks, length: length)
            #expect(counts.max()! - counts.min()! <= (zig ? 2 : 1))
        }
    }

    @Test(arguments: [1, 2, 3, 4, 8], SequenceLayout.allCases)
    func scatterGatherRoundTrip(ranks: Int, layout: SequenceLayout) throws {
        for length in [1, 3, ranks, 2 * ranks + 1, 29] {
            let global = Tensor(shape: [2, length, 3], values: (0..<(2 * length * 3)).map { Float($0) })
            let gathered = try InProcessCluster.run(ranks: ranks, timeout: 30) { comm in
                let local = layout.scatter(global, rank: comm.rank, ranks: ranks)
                #expect(local.shape == [2, layout.counts(ranks: ranks, length: length)[comm.rank], 3])
                return try layout.gather(local, length: length, comm: comm).toArray()
            }
            for g in gathered { #expect(g == global.toArray(), "L=\(length)") }
        }
    }

    /// Each rank holds a full tensor of partial sums (rank r: value + r); reduceScatter leaves each rank the sum over
    /// ranks of its own rows.
    @Test(arguments: [1, 3, 4], SequenceLayout.allCases)
    func reduceScatterIsTheAdjointOfGather(ranks: Int, layout: SequenceLayout) throws {
        let length = 11
        let base = (0..<(2 * length * 2)).map { Float($0) }
        let results = try InProcessCluster.run(ranks: ranks, timeout: 30) { comm in
            let full = Tensor(shape: [2, length, 2], values: base.map { $0 + Float(comm.rank) })
            return try layout.reduceScatter(full, comm: comm).toArray()
        }
        let offset = Float((0..<ranks).reduce(0, +))
        for r in 0..<ranks {
            let expected = layout.scatter(Tensor(shape: [2, length, 2], values: base.map { $0 * Float(ranks) + offset }), rank: r, ranks: ranks)
            #expect(results[r] == expected.toArray())
        }
    }
}
