// An alpha-beta cost model of one attention step per algorithm, calibrated from `seqpar bench` output, so a user can
// pick an algorithm for L, H, D, P and a network before renting a cluster.
//
// Calibration (JSON lines of the benches, any mix):
//   bench kernel   GFLOP/s of the blockwise softmax and chunkwise linear kernels with k ranks busy at once on a
//                  host (k = 1, 4, 16 ...): the compute rate a rank gets when its host's other cores work too
//   bench comm     time per call against message size for ring, allgather, alltoall (and pingpong) at P ranks:
//                  each fitted as t = alpha + n * gamma (weighted least squares, relative error)
//   bench attention / latent, one rank
//                  each algorithm's own rate on one rank: RSA's and LASP's over the kernel's at its length (RSA
//                  multiplies whole score rows), Ulysses' and allgather's over ring's (or dense's) one-rank rate, whose
//                  own rate over the kernel's is the causal diagonal block's efficiency; one factor per algorithm and
//                  direction (1 where none is given)
//   bench overlap  ring attention's measured overlap omega per direction (default 0.8)
//
// Step time for L tokens over P ranks, C = L/P tokens per rank, B = 1, rate R = kernel rate at k = min(P, ranks per
// host) busy ranks and C tokens (L for Ulysses and allgather, whose queries see the whole sequence) (interpolated in
// log k and log C, clamped to the measured range; the slowest rank's figure, which a step of equally busy ranks waits
// for; the linear kernel's from its figures at the problem's H where there are any, else by working set C x H) times
// the algorithm's factor; a causal diagonal block of n tokens at the kernel's rate at n times the diagonal's
// efficiency at n. Where the kernel was measured more than once (before and after a sweep), R is the mean and
// the spread between the runs is reported as the point's drift, the host's own error bar;
// F = 4 H L^2 D (half causal) for softmax, H L (8 D^2 + 4*128 D) for linear (backward 2.5x, 3x):
//   ring       per step compute c, exchange m = alpha + 2 G C D 4 gamma (K and V; backward also dK and dV on P-2 of
//              the P-1 steps, and their last hop home behind half the own block); a step costs c + m - omega min(c, m).
//              zigzag (or no mask): c = F/P^2 per step, P steps; contiguous causal: the last rank's half diagonal
//              block then P-1 full blocks of 4 H C^2 D
//   rsa        two rings (K, then V), messages of G C D 4 bytes, same overlap rule, compute F/P at RSA's rate
//   ulysses    all-to-all of (H + 2G) C D 4 bytes, F/P, all-to-all of H C D 4 bytes back (backward: twice each)
//   usp        ring attention over P/U ranks on H/U heads (the same hop bytes; the kernel rate at every rank busy),
//              plus Ulysses' two all-to-alls among U ranks (backward: twice each)
//   allgather  allgather of 2 G C D 4 bytes per rank, then the slowest rank's compute: contiguous causal
//              4 H D C (L - C/2), zigzag F/P, no mask 4 H D C L
//   lasp2      F/P + one allgather of H D^2 4 bytes per rank (its state products are in F/P's one-rank rate)
//   lasp1      F/P + P-1 dependent steps, each a point-to-point hop of H D^2 4 bytes plus the products the paper's
//              order puts on the chain: the inter-chunk term and the state, 4 H C D^2 (backward: the dK and dV terms
//              and dM, 6 H C D^2; without a mask the state alone, 2 H C D^2, and P-1 more hops back down)
//   tpla       decode: a rank's shard is one-rank MLA decode over d_c/P latent columns and the d_r RoPE ones: the
//              one-rank step per cached token and head at that latent width (from bench latent figures of mla or tpla
//              on one rank with the problem's d_r, d_v and queries per step, interpolated in log L and log width;
//              beyond the measured widths the nearest scaled by (w + d_r)), times the
//              memory contention of k busy ranks (the linear kernel's rate ratio at its longest length, which is
//              bandwidth-bound), plus an all-reduce of H T d_v 4 bytes
// Collectives at a measured P use that P's fit (log-interpolated between measured P); elsewhere, and always under
// --network, Hockney's forms from the point-to-point link: allgather (P-1)(alpha + n gamma), all-to-all
// (P-1)(alpha + n/P gamma), all-reduce 2 (P-1)(alpha + n/P gamma).
import Foundation

public struct CostModel: Sendable {
    /// A kernel's measured rate.
    public struct KernelRate: Sendable, Equatable {
        public var kernel: String, direction: String
        public var ranksAtOnce: Int, seqLen: Int
        public var heads: Int = 1
        /// The slowest rank's rate (the figure's `gflops`): with every rank equally busy, each waits for it.
        public var gflops: Double
    }

    /// t = alpha + n * gamma for one operation at one rank count.
    public struct Link: Sendable, Equatable {
        public var alpha: Double, gamma: Double
        public func time(_ bytes: Double) -> Double { alpha + bytes * gamma }
    }

    public var kernelRates: [KernelRate] = []
    /// Fits per operation ("ring", "allgather", "alltoall", "pingpong") and rank count.
    public var links: [String: [Int: Link]] = [:]
    /// Per algorithm and direction: its one-rank rate over the kernel's ("ring forward" -> 1.02).
    /// Several one-rank figures of one algorithm (other L or H) give one factor: their geometric mean, whatever the
    /// order of the files.
    public var algorithmFactors: [String: [Double]] = [:]

    func algorithmFactor(_ algorithm: String, _ direction: String) -> Double {
        guard let fs = algorithmFactors["\(algorithm) \(direction)"], !fs.isEmpty else { return 1 }
        return exp(fs.map { log($0) }.reduce(0, +) / Double(fs.count))
    }
    /// A one-rank decode step (MLA, or TPLA on one rank) and its shape.
    public struct DecodeFigure: Sendable, Equatable {
        public var timeS: Double
        public var seqLen: Int, heads: Int, latentDim: Int, ropeDim: Int
        public var vDim = 128, queries = 1
    }
    /// One-rank decode steps, for the TPLA prediction.
    public var decodeOneRank: [DecodeFigure] = []
    public var overlap: [String: Double] = ["forward": 0.8, "backward": 0.8]
    /// A causal diagonal block's rate over the full-mask kernel rate, by block length and direction (from one-rank
    /// ring or dense figures; 1 without them).
    public var diagonalEfficiency: [String: [(Double, Double)]] = [:]

    func diagonal(_ direction: String, _ tokens: Double) -> Double {
        Self.interpolateLog(diagonalEfficiency[direction] ?? [], at: tokens) ?? 1
    }
    /// A network that replaces every measured link (Hockney forms throughout).
    public var network: Link?

    public init() {}

    // MARK: calibration

    /// Fits t = alpha + n gamma to (bytes, seconds), minimising relative error; alpha and gamma at least 0.
    public static func fit(_ points: [(bytes: Double, seconds: Double)]) throws -> Link {
        guard points.count >= 2, Set(points.map(\.bytes)).count >= 2 else {
            throw SeqParError.invalidInput("a link fit needs two message sizes or more (got \(points.count) point(s)): run seqpar bench comm with several --size values")
        }
        var (sw, sx, sy, sxx, sxy) = (0.0, 0.0, 0.0, 0.0, 0.0)
        for p in points {
            let w = 1 / (p.seconds * p.seconds)
            sw += w; sx += w * p.bytes; sy += w * p.seconds; sxx += w * p.bytes * p.bytes; sxy += w * p.bytes * p.seconds
        }
        let det = sw * sxx - sx * sx
        var gamma = (sw * sxy - sx * sy) / det
        var alpha = (sy - gamma * sx) / sw
        if alpha < 0 { alpha = 0; gamma = sxy / sxx }
        if gamma < 0 { gamma = 0; alpha = sy / sw }
        return Link(alpha: alpha, gamma: gamma)
    }

    /// Parses "bw=25GB/s,lat=2us" (bw in GB/s, GiB/s, MB/s, kB/s, B/s, or bits: Gb/s, Gbit/s, Mb/s; lat in s, ms, us or ns).
    public static func parseNetwork(_ text: String) throws -> Link {
        var bw: Double?, lat: Double?
        for part in text.split(separator: ",") {
            let kv = part.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            guard kv.count == 2 else { throw SeqParError.invalidInput("--network \"\(text)\": \"\(part)\" is not key=value: write e.g. \"bw=25GB/s,lat=2us\"") }
            let v = kv[1]
            let number = Double(v.prefix { "0123456789.eE+-".contains($0) }) ?? .nan
            let unit = String(v.drop { "0123456789.eE+-".contains($0) })
            switch kv[0].lowercased() {
            case "bw":
                // Bytes in capitals (GB/s), bits spelled out or lower-case b (Gbit/s, Gb/s, as NICs are quoted).
                let scale: [String: Double] = ["GB/s": 1e9, "GiB/s": 1073741824, "MB/s": 1e6, "kB/s": 1e3, "B/s": 1,
                                               "Gbit/s": 1.25e8, "Gb/s": 1.25e8, "Gbps": 1.25e8, "Mbit/s": 1.25e5, "Mb/s": 1.25e5]
                guard let s = scale[unit] else {
                    throw SeqParError.invalidInput("--network bw=\(kv[1]): give a unit, one of GB/s, GiB/s, MB/s, kB/s, B/s (bytes) or Gb/s, Gbit/s, Mb/s (bits)")
                }
                bw = number * s
            case "lat":
                let scale: [String: Double] = ["s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9]
                guard let s = scale[unit.lowercased()] else { throw SeqParError.invalidInput("--network lat=\(kv[1]): give a unit, one of s, ms, us, ns") }
                lat = number * s
            default: throw SeqParError.invalidInput("--network: unknown key \"\(kv[0])\": the keys are bw and lat")
            }
        }
        guard let b = bw, let l = lat, b.isFinite, b > 0, l.isFinite, l >= 0 else {
            throw SeqParError.invalidInput("--network \"\(text)\": give both a positive bandwidth and a latency, e.g. \"bw=25GB/s,lat=2us\"")
        }
        return Link(alpha: l, gamma: 1 / b)
    }

    /// Reads bench JSON lines (kernel, comm, overlap, one-rank attention and latent figures); other lines are
    /// skipped, malformed JSON is an error naming the line.
    public mutating func calibrate(_ text: String, name: String) throws {
        var comm: [String: [Int: [(Double, Double)]]] = [:]
        var oneRank: [(algorithm: String, direction: String, seqLen: Int, heads: Int, gflops: Double)] = []
        var used = 0
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            guard line.hasPrefix("{") else { continue }
            guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                throw SeqParError.invalidInput("\(name) line \(i + 1): malformed JSON")
            }
            func number(_ key: String) throws -> Double {
                guard let v = object[key] as? NSNumber else { throw SeqParError.invalidInput("\(name) line \(i + 1): the field \"\(key)\" is missing or not a number") }
                return v.doubleValue
            }
            func string(_ key: String) throws -> String {
                guard let v = object[key] as? String else { throw SeqParError.invalidInput("\(name) line \(i + 1): the field \"\(key)\" is missing or not text") }
                return v
            }
            switch object["bench"] as? String {
            case "kernel":
                // The softmax kernel works head by head (its rate is per head); the linear one's follows the heads too.
                let kernel = try string("kernel")
                let heads = kernel == BenchKernel.linear.name ? Int((object["heads"] as? NSNumber)?.intValue ?? 1) : 1
                kernelRates.append(KernelRate(kernel: kernel, direction: try string("direction"), ranksAtOnce: Int(try number("ranks")),
                                              seqLen: Int(try number("seq_len")), heads: heads, gflops: try number("gflops")))
            case "comm":
                comm[try string("operation"), default: [:]][Int(try number("ranks")), default: []].append((try number("bytes"), try number("time_s")))
            case "overlap":
                overlap[try string("direction")] = min(max(try number("overlap"), 0), 1)
            case "attention" where Int(try number("ranks")) == 1 && (object["causal"] as? Bool ?? true):
                oneRank.append((try string("algorithm"), try string("direction"), Int(try number("seq_len")), Int(try number("heads")), try number("gflops")))
            case "latent" where Int(try number("ranks")) == 1 && ["tpla", "mla"].contains(object["algorithm"] as? String):
                decodeOneRank.append(DecodeFigure(timeS: try number("time_s"), seqLen: Int(try number("seq_len")), heads: Int(try number("heads")),
                                                  latentDim: Int(try number("latent_dim")), ropeDim: Int(try number("rope_dim")),
                                                  vDim: Int(try number("v_dim")), queries: Int(try number("queries"))))
            default: continue
            }
            used += 1
        }
        guard used > 0 else {
            throw SeqParError.invalidInput("\(name): no bench figures in it: give the --json output of seqpar bench kernel, comm, overlap, attention or latent")
        }
        for (op, byRanks) in comm { for (p, pts) in byRanks { links[op, default: [:]][p] = try Self.fit(pts.map { (bytes: $0.0, seconds: $0.1) }) } }
        // Softmax: the one-rank ring (or dense) figure is the blockwise kernel on one causal (or full) block of L:
        // its rate over the kernel's full-mask rate is the diagonal block's efficiency; Ulysses' and allgather's rates
        // are taken relative to it (their model has the diagonal blocks). RSA multiplies whole score rows, masked or
        // not, and LASP is the linear kernel: their one-rank rates over the kernel's at the same size.
        for o in oneRank where ["ring", "dense"].contains(o.algorithm) {
            guard let r = kernelRate(.softmax, o.direction, ranksAtOnce: 1, tokens: o.seqLen) else { continue }
            diagonalEfficiency[o.direction, default: []].append((Double(o.seqLen), o.gflops / r))
        }
        for o in oneRank {
            guard let name = AlgorithmName(rawValue: o.algorithm), ![.ring, .dense].contains(name) else { continue }
            if name == .rsa || name.family == .linear {
                if let r = kernelRate(name.family, o.direction, ranksAtOnce: 1, tokens: o.seqLen, heads: o.heads) {
                    algorithmFactors["\(o.algorithm) \(o.direction)", default: []].append(o.gflops / r)
                }
            } else if let base = oneRank.first(where: { ["ring", "dense"].contains($0.algorithm) && $0.direction == o.direction && $0.seqLen == o.seqLen && $0.heads == o.heads }) {
                algorithmFactors["\(o.algorithm) \(o.direction)", default: []].append(o.gflops / base.gflops)
            }
        }
    }

    // MARK: lookups

    /// How figures measured more than once at one x combine.
    public enum Repeats: Sendable { case mean, lowest, highest }

    /// Linear interpolation of `f` at `x` over sorted (x, f) in log x, clamped to the ends; points at one x (the same
    /// figure measured twice) count as their mean (or their lowest or highest).
    static func interpolateLog(_ points: [(Double, Double)], at x: Double, repeats: Repeats = .mean) -> Double? {
        let s = Dictionary(grouping: points, by: \.0).map { x, ps in
            let f = ps.map(\.1)
            return (x, repeats == .lowest ? f.min()! : repeats == .highest ? f.max()! : f.reduce(0, +) / Double(f.count))
        }.sorted { $0.0 < $1.0 }
        guard let first = s.first, let last = s.last else { return nil }
        if x <= first.0 { return first.1 }
        if x >= last.0 { return last.1 }
        let j = s.firstIndex { $0.0 >= x }!
        let (a, b) = (s[j - 1], s[j])
        let t = (log(x) - log(a.0)) / (log(b.0) - log(a.0))
        return a.1 + t * (b.1 - a.1)
    }

    /// The kernel's GFLOP/s with `ranksAtOnce` busy ranks at `tokens` per rank, interpolated (nil without figures).
    /// Softmax: per head, whatever `heads`. Linear: from the figures at these `heads` if there are any (interpolated in
    /// tokens), else (or with no `heads`) from all of them by working set, tokens x heads.
    public func kernelRate(_ family: AlgorithmName.Family, _ direction: String, ranksAtOnce k: Int, tokens: Int, heads: Int? = nil,
                           repeats: Repeats = .mean) -> Double? {
        let name = family == .softmax ? BenchKernel.softmax.name : BenchKernel.linear.name
        var mine = kernelRates.filter { $0.kernel == name && $0.direction == direction }
        var x = { (r: KernelRate) in Double(r.seqLen) }, at = Double(max(tokens, 1))
        if family == .linear {
            let same = heads.map { h in mine.filter { $0.heads == h } } ?? []
            if same.isEmpty {
                (x, at) = ({ Double($0.seqLen * $0.heads) }, Double(max(tokens * (heads ?? 1), 1)))
            } else {
                mine = same
            }
        }
        let byRanks = Dictionary(grouping: mine, by: \.ranksAtOnce).compactMap { k, rs in
            Self.interpolateLog(rs.map { (x($0), $0.gflops) }, at: at, repeats: repeats).map { (Double(k), $0) }
        }
        return Self.interpolateLog(byRanks, at: Double(max(k, 1)))
    }

    /// How far the host moved the kernel's rate between repeated calibrations at this point: the highest figure over
    /// the lowest, minus 1 (0 where each length was measured once; nil without figures). A prediction from their mean
    /// cannot be trusted closer than about half of it.
    public func kernelDrift(_ family: AlgorithmName.Family, _ direction: String, ranksAtOnce k: Int, tokens: Int, heads: Int? = nil) -> Double? {
        guard let lo = kernelRate(family, direction, ranksAtOnce: k, tokens: tokens, heads: heads, repeats: .lowest),
              let hi = kernelRate(family, direction, ranksAtOnce: k, tokens: tokens, heads: heads, repeats: .highest), lo > 0 else { return nil }
        return hi / lo - 1
    }

    /// The point-to-point link at `ranks`: the network, else the ring fit (log-interpolated over measured P), else
    /// the ping-pong fit.
    func pointToPoint(_ ranks: Int) throws -> Link {
        if let n = network { return n }
        for op in ["ring", "pingpong"] { if let l = interpolatedLink(op, ranks) { return l } }
        throw SeqParError.invalidInput("no communication figures: calibrate with seqpar bench comm --json output, or give --network")
    }

    func interpolatedLink(_ op: String, _ ranks: Int) -> Link? {
        guard let fits = links[op], !fits.isEmpty else { return nil }
        let pts = fits.sorted { $0.key < $1.key }
        guard let a = Self.interpolateLog(pts.map { (Double($0.key), $0.value.alpha) }, at: Double(ranks)),
              let g = Self.interpolateLog(pts.map { (Double($0.key), $0.value.gamma) }, at: Double(ranks)) else { return nil }
        return Link(alpha: a, gamma: g)
    }

    /// A collective's time for `bytes` (allgather: per-rank contribution; alltoall and allreduce: per-rank buffer):
    /// the measured fit within the measured range of P (without --network), else Hockney's form.
    func collective(_ op: String, bytes: Double, ranks p: Int) throws -> Double {
        if p <= 1 { return 0 }
        if network == nil, let fits = links[op], let lo = fits.keys.min(), let hi = fits.keys.max(), p >= lo, p <= hi,
           let l = interpolatedLink(op, p) {
            return l.time(bytes)
        }
        let link = try pointToPoint(p)
        let n = Double(p)
        switch op {
        case "allgather": return (n - 1) * link.time(bytes)
        case "alltoall": return (n - 1) * link.time(bytes / n)
        default: return 2 * (n - 1) * link.time(bytes / n)  // allreduce: reduce-scatter + allgather
        }
    }

    // MARK: prediction

    public struct Problem: Sendable {
        public var algorithm: String
        public var seqLen: Int, heads: Int, kvHeads: Int, headDim: Int
        public var causal = true
        public var layout: SequenceLayout = .contiguous
        public var direction = "forward"
        public var ranks: Int
        public var ranksPerHost: Int
        /// Decode only.
        public var queries = 1, latentDim = 512, ropeDim = 64, vDim = 128
        /// USP only: U, the ranks of a Ulysses group.
        public var ulyssesDegree = 1
        /// Ranks busy at once on a host, where not min(ranks, ranksPerHost) (USP's ring runs on P/U ranks, every one busy).
        var busyRanks: Int? = nil

        public init(algorithm: String, seqLen: Int, heads: Int, kvHeads: Int? = nil, headDim: Int, causal: Bool = true,
                    layout: SequenceLayout = .contiguous, direction: String = "forward", ranks: Int, ranksPerHost: Int) {
            self.algorithm = algorithm; self.seqLen = seqLen; self.heads = heads; self.kvHeads = kvHeads ?? heads; self.headDim = headDim
            self.causal = causal; self.layout = layout; self.direction = direction; self.ranks = ranks; self.ranksPerHost = ranksPerHost
        }
    }

    public struct Prediction: Sendable, Equatable {
        public var timeS: Double
        /// Compute on the critical path, communication, and how much of it stays exposed.
        public var computeS: Double, commS: Double, exposedCommS: Double
        /// The kernel's drift between repeated calibrations at this point (`kernelDrift`), where known.
        public var drift: Double? = nil
    }

    /// The predicted step time; errors for a problem the algorithm cannot run or the calibration does not cover.
    public func predict(_ q: Problem) throws -> Prediction {
        var r = try predictTime(q)
        let k = min(q.ranks, max(q.ranksPerHost, 1))
        if q.algorithm == "tpla" {
            r.drift = kernelDrift(.linear, "forward", ranksAtOnce: k, tokens: 1 << 30)
        } else if let name = AlgorithmName(rawValue: q.algorithm) {
            r.drift = kernelDrift(name.family, q.direction, ranksAtOnce: k, tokens: Self.kernelTokens(name, q), heads: q.heads)
        }
        return r
    }

    /// The kernel's length: keys per query. Ulysses attends over the whole sequence (H/P heads), allgather's queries
    /// over the gathered keys; the ring's and the rest's blocks are a rank's chunk.
    static func kernelTokens(_ name: AlgorithmName, _ q: Problem) -> Int {
        name == .ulysses || name == .allgather ? q.seqLen : q.seqLen / max(q.ranks, 1)
    }

    func predictTime(_ q: Problem) throws -> Prediction {
        let p = q.ranks, backward = q.direction == "backward"
        guard p >= 1, q.seqLen >= p, q.heads >= 1, q.headDim >= 1, q.kvHeads >= 1, q.heads % q.kvHeads == 0 else {
            throw SeqParError.invalidInput("model: L=\(q.seqLen), H=\(q.heads), G=\(q.kvHeads), D=\(q.headDim), P=\(p): need L >= P, G dividing H, all positive")
        }
        let (h, g, d, l) = (Double(q.heads), Double(q.kvHeads), Double(q.headDim), Double(q.seqLen))
        let c = l / Double(p), pd = Double(p), k = q.busyRanks ?? min(p, max(q.ranksPerHost, 1))
        let f = 4.0
        if q.algorithm == "tpla" { return try predictDecode(q, k: k) }
        guard let name = AlgorithmName(rawValue: q.algorithm) else {
            throw SeqParError.invalidInput("model: unknown algorithm \"\(q.algorithm)\": give dense, allgather, ring, rsa, ulysses, usp, lasp1, lasp2 or tpla")
        }
        if name == .dense && p != 1 { throw SeqParError.invalidInput("model: dense runs on one rank") }
        if name == .usp {
            // Ring attention across P/U groups on H/U heads (blocks of U C tokens, as many bytes a hop as the ring's C
            // tokens of G heads), every one of the P ranks busy; plus Ulysses' all-to-alls inside each group of U.
            let u = q.ulyssesDegree
            guard u >= 1, p % u == 0, q.heads % u == 0, q.kvHeads % u == 0 || (q.heads / q.kvHeads) % (q.heads / u) == 0 else {
                throw SeqParError.invalidInput("model: usp needs the Ulysses degree (\(u)) to divide P (\(p)) and the heads (\(q.heads)), and the kv heads (\(q.kvHeads)) or heads/U to divide heads/kv-heads")
            }
            var ring = q
            (ring.algorithm, ring.heads, ring.kvHeads, ring.ranks, ring.ulyssesDegree, ring.busyRanks) = ("ring", q.heads / u, max(q.kvHeads / u, 1), p / u, 1, k)
            let r = try predictTime(ring)
            let a2a = u == 1 ? 0 : (backward ? 2 : 1) * (try collective("alltoall", bytes: (h + 2 * g) * c * d * 4, ranks: u) + collective("alltoall", bytes: h * c * d * 4, ranks: u))
            return Prediction(timeS: r.timeS + a2a, computeS: r.computeS, commS: r.commS + a2a, exposedCommS: r.exposedCommS + a2a)
        }
        if name == .ulysses && (q.heads % p != 0 || q.kvHeads % p != 0) {
            throw SeqParError.invalidInput("model: ulysses needs P (\(p)) to divide the heads (\(q.heads)) and kv heads (\(q.kvHeads))")
        }
        guard let kernel = kernelRate(name.family, q.direction, ranksAtOnce: k, tokens: Self.kernelTokens(name, q), heads: q.heads) else {
            throw SeqParError.invalidInput("model: no \(name.family) kernel figures for \(q.direction): calibrate with seqpar bench kernel --kernel softmax linear --json output")
        }
        let ownFactor = algorithmFactor(q.algorithm, q.direction)
        let rate = kernel * 1e9 * ownFactor
        let factor = backward ? AttentionRun.backwardFlopsFactor(name.family) : 1
        let total = AttentionRun.attentionFlops(AttentionShape(seqLen: q.seqLen, heads: q.heads, kvHeads: q.kvHeads, headDim: q.headDim),
                                                causal: name.family == .linear ? true : q.causal, family: name.family) * factor
        /// Seconds for a causal diagonal block of n tokens (all heads): the kernel's rate at n times the diagonal's
        /// efficiency at n (both calibrated at n).
        func diagonalBlock(_ n: Double) -> Double {
            let r = (kernelRate(name.family, q.direction, ranksAtOnce: k, tokens: Int(n), heads: q.heads) ?? kernel) * 1e9 * ownFactor
            return 2 * h * n * n * d * factor / (r * diagonal(q.direction, n))
        }
        let omega = overlap[q.direction] ?? 0.8
        let kvBytes = 2 * g * c * d * 4
        func overlapped(_ steps: Double, compute cs: Double, comm m: Double) -> (Double, Double) {
            (steps * (cs + m - omega * min(cs, m)), steps * max(m - omega * min(cs, m), 0))
        }
        switch name {
        case .dense:
            let t = q.causal ? diagonalBlock(l) : total / rate
            return Prediction(timeS: t, computeS: t, commS: 0, exposedCommS: 0)
        case .ring:
            let link = try pointToPoint(p)
            // Backward: P-1 K/V hops and P-1 dK/dV hops; the last dK/dV hop goes home after the last step (behind half
            // the own block), the other P-2 ride along with steps 2 ... P-1.
            let kvHop = p == 1 ? 0 : link.time(kvBytes)
            let m = kvHop + (backward && p > 2 ? kvHop * Double(p - 2) / Double(p - 1) : 0)
            let homeHop = backward && p > 1 ? kvHop : 0
            let block = f * h * c * c * d * factor / rate
            // Own block first (a causal diagonal), then P-1 blocks as they arrive: whole blocks on the last rank of
            // the contiguous layout, half blocks under zigzag, whole blocks without a mask.
            let first = !q.causal ? block : q.layout == .zigzag ? 2 * diagonalBlock(c / 2) + block / 4 : diagonalBlock(c)
            let perStep = !q.causal || q.layout == .contiguous ? block : block / 2
            let steps = pd - 1
            let (t, exposed) = overlapped(steps, compute: perStep, comm: m)
            // Backward keeps half the own block back to hide the accumulators' last hop home behind.
            let home = homeHop - omega * min(first / 2, homeHop)
            return Prediction(timeS: first + t + home, computeS: first + steps * perStep, commS: steps * m + homeHop, exposedCommS: exposed + home)
        case .rsa:
            let link = try pointToPoint(p)
            let m = p == 1 ? 0 : link.time(kvBytes / 2)
            let passes = backward ? 4.0 : 2.0
            let perStep = total / pd / (passes * pd) / rate
            let (t, exposed) = overlapped(passes * (pd - 1), compute: perStep, comm: m)
            let compute = total / pd / rate
            return Prediction(timeS: compute - passes * (pd - 1) * perStep + t, computeS: compute, commS: passes * (pd - 1) * m, exposedCommS: exposed)
        case .ulysses:
            let times = backward ? 2.0 : 1
            let comm = times * (try collective("alltoall", bytes: (h + 2 * g) * c * d * 4, ranks: p) + collective("alltoall", bytes: h * c * d * 4, ranks: p))
            // H/P heads over the whole sequence: one diagonal block of L per head group.
            let compute = q.causal ? diagonalBlock(l) / pd : total / pd / rate
            return Prediction(timeS: compute + comm, computeS: compute, commS: comm, exposedCommS: comm)
        case .allgather:
            let comm = try collective("allgather", bytes: kvBytes, ranks: p) * (backward ? 2 : 1)
            let compute: Double = !q.causal ? f * h * d * c * l * factor / rate
                : q.layout == .zigzag ? 2 * diagonalBlock(c / 2) + f * h * d * (c / 2) * (l - c / 2) * factor / rate
                : diagonalBlock(c) + f * h * d * c * (l - c) * factor / rate
            return Prediction(timeS: compute + comm, computeS: compute, commS: comm, exposedCommS: comm)
        case .usp:
            preconditionFailure("usp is predicted above, as ring attention over its groups")
        case .lasp1, .lasp2:
            let state = h * d * d * 4
            // Besides the kernel's chunk, a rank forms its state and adds the inter-chunk terms: LASP does both on one
            // rank too, so the algorithm's one-rank factor over the kernel already prices them once.
            let compute = total / pd / rate
            if name == .lasp2 {
                let comm = try collective("allgather", bytes: state, ranks: p)
                return Prediction(timeS: compute + comm, computeS: compute, commS: comm, exposedCommS: comm)
            }
            let steps = (q.causal ? 1 : 2) * (pd - 1)
            let hop = p == 1 ? 0 : try pointToPoint(p).time(state)
            // Without a mask only the state (2 H C D^2) is formed on the way up the chain.
            let products = (q.causal ? (backward ? 6 : 4) : 2) * h * c * d * d / rate
            return Prediction(timeS: compute + (pd - 1) * products + steps * hop, computeS: compute + (pd - 1) * products,
                              commS: steps * hop, exposedCommS: steps * hop)
        }
    }

    func predictDecode(_ q: Problem, k: Int) throws -> Prediction {
        let figures = decodeOneRank.filter { $0.ropeDim == q.ropeDim && $0.vDim == q.vDim && $0.queries == q.queries }
        guard !figures.isEmpty else {
            throw SeqParError.invalidInput("model: tpla needs one-rank decode figures with d_r = \(q.ropeDim), d_v = \(q.vDim) and \(q.queries) query token(s) per step: calibrate with seqpar bench latent --algorithm tpla (or mla) --json on one rank")
        }
        guard q.latentDim % q.ranks == 0 || q.ranks == 1 else { throw SeqParError.invalidInput("model: tpla needs P (\(q.ranks)) to divide d_c (\(q.latentDim))") }
        // Seconds per cached token and head at each measured latent width (interpolated in L), then at this rank's
        // width d_c/P.
        let byWidth = Dictionary(grouping: figures, by: \.latentDim).compactMap { w, fs in
            Self.interpolateLog(fs.map { (Double($0.seqLen), $0.timeS / Double($0.seqLen * $0.heads)) }, at: Double(q.seqLen)).map { (Double(w), $0) }
        }.sorted { $0.0 < $1.0 }
        let width = Double(q.latentDim) / Double(q.ranks), rope = Double(q.ropeDim)
        let nearest = width < byWidth.first!.0 ? byWidth.first! : width > byWidth.last!.0 ? byWidth.last! : nil
        let perToken = nearest.map { $0.1 * (width + rope) / ($0.0 + rope) } ?? Self.interpolateLog(byWidth, at: width)!
        let contention = kernelRate(.linear, "forward", ranksAtOnce: 1, tokens: 1 << 30).flatMap { r1 in
            kernelRate(.linear, "forward", ranksAtOnce: k, tokens: 1 << 30).map { r1 / $0 } } ?? 1
        let compute = perToken * Double(q.seqLen * q.heads) * contention
        let comm = try collective("allreduce", bytes: Double(q.heads * q.queries * q.vDim * 4), ranks: q.ranks)
        return Prediction(timeS: compute + comm, computeS: compute, commS: comm, exposedCommS: comm)
    }

    /// The model's prediction for a measured figure, or nil where it does not apply.
    public func predict(_ point: ScalingPoint, ranksPerHost: Int) throws -> Prediction? {
        guard point.bench != "latent" || point.algorithm == "tpla" else { return nil }  // the model has TPLA decode only
        var q = Problem(algorithm: point.bench == "latent" ? "tpla" : point.algorithm, seqLen: point.seqLen, heads: point.heads,
                        headDim: point.headDim ?? 64, causal: point.causal ?? true, layout: SequenceLayout(rawValue: point.layout ?? "contiguous") ?? .contiguous,
                        direction: point.direction, ranks: point.ranks, ranksPerHost: ranksPerHost)
        if let kv = point.kvHeads { q.kvHeads = kv }
        if let v = point.latentDim { q.latentDim = v }
        if let v = point.ropeDim { q.ropeDim = v }
        if let v = point.vDim { q.vDim = v }
        if let v = point.queries { q.queries = v }
        return try predict(q)
    }
}
