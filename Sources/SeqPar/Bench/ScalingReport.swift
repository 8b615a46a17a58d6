// Scaling sweeps as tables and plots: reads the JSON lines that `seqpar bench attention|latent --json` print (one
// object per figure, as `launch/scaling` collects them), writes one CSV row per figure and SVG line plots, with
// nothing beyond the project itself.
//
// A series is one algorithm in one configuration (layout, mask, direction); its points are the rank counts. Weak
// scaling keeps tokens per rank fixed (L grows with P), strong scaling keeps L fixed. Efficiency is the bench's own
// taken from the series' one-rank point where the sweep has one (strong T_1 / (P T_P), weak GFLOP/s_P over P times
// GFLOP/s_1), else it is the bench's own (GFLOP/s over P times a one-rank baseline measured in the same launch).
import Foundation

/// One figure of a sweep, as read back from a bench's JSON line.
public struct ScalingPoint: Codable, Sendable, Equatable {
    public var bench: String
    public var algorithm: String
    public var direction: String
    public var ranks: Int
    public var seqLen: Int
    public var heads: Int
    public var kvHeads: Int?
    public var headDim: Int?
    public var causal: Bool?
    public var layout: String?
    /// bench attention's token split ("equal" or "speed"; absent in older files: equal).
    public var balance: String?
    public var timeS: Double
    public var gflops: Double?
    public var tokensPerS: Double?
    public var efficiency: Double?
    public var overlap: Double?
    public var bytesSent: Int?
    public var peakRssBytes: Int?
    /// Seconds per step blocked in communication, the most and the least over ranks (bench attention's wait_s).
    public var waitS: Double?, waitMinS: Double?
    /// Latent (TPLA decode) figures: d_c, d_r, d_v and query tokens per step.
    public var latentDim: Int?, ropeDim: Int?, vDim: Int?, queries: Int?

    /// The series this point belongs to: algorithm, layout (and "speed-balanced" for shares by speed), mask, direction.
    public var series: String {
        var parts = [bench == "latent" ? "\(algorithm) decode" : algorithm]
        if let l = layout, bench == "attention", ["ring", "rsa", "ulysses", "allgather"].contains(algorithm) { parts.append(l) }
        if bench == "attention", balance == "speed" { parts.append("speed-balanced") }
        if bench == "attention", let c = causal { parts.append(c ? "causal" : "full") }
        parts.append(direction)
        return parts.joined(separator: " ")
    }
}

public enum ScalingMode: String, CaseIterable, Codable, Sendable {
    case weak, strong
}

public enum ScalingReport {
    /// Every figure in `text` (JSON lines; blank lines and `#` lines skipped). `name` names the file in errors.
    public static func parse(_ text: String, name: String) throws -> [ScalingPoint] {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        decoder.nonConformingFloatDecodingStrategy = .convertFromString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        var points: [ScalingPoint] = []
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            let where_ = "\(name) line \(i + 1)"
            guard line.hasPrefix("{") else {
                throw SeqParError.invalidInput("\(where_): not a JSON object (\(line.prefix(60))...): give the output of `seqpar bench attention|latent --json`, one object per line")
            }
            let point: ScalingPoint
            do { point = try decoder.decode(ScalingPoint.self, from: Data(line.utf8)) } catch let DecodingError.keyNotFound(key, _) {
                throw SeqParError.invalidInput("\(where_): the field \"\(key.stringValue.snakeCased)\" is missing: is this a `seqpar bench attention|latent --json` line?")
            } catch let DecodingError.typeMismatch(_, context) {
                throw SeqParError.invalidInput("\(where_): the field \"\(context.codingPath.map(\.stringValue.snakeCased).joined(separator: "."))\" has the wrong type")
            } catch {
                throw SeqParError.invalidInput("\(where_): malformed JSON: \(line.prefix(60))...")
            }
            guard ["attention", "latent"].contains(point.bench) else {
                throw SeqParError.invalidInput("\(where_): bench \"\(point.bench)\" is not a scaling figure: give `seqpar bench attention` or `seqpar bench latent` output")
            }
            guard point.ranks >= 1, point.seqLen >= 1, point.timeS.isFinite, point.timeS > 0 else {
                throw SeqParError.invalidInput("\(where_): ranks \(point.ranks), seq_len \(point.seqLen), time_s \(point.timeS): each must be positive")
            }
            points.append(point)
        }
        guard !points.isEmpty else {
            throw SeqParError.invalidInput("\(name): no figures in it: run the sweep first (launch/scaling), or give the file its --json output went to")
        }
        return points
    }

    /// The text of `path`; an unreadable path is an error naming it.
    public static func text(of path: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SeqParError.invalidInput("\(path): cannot read the file: check the path")
        }
        return String(decoding: data, as: UTF8.self)
    }

    /// Reads `path` and parses it.
    public static func load(_ path: String) throws -> [ScalingPoint] {
        try parse(text(of: path), name: path)
    }

    /// Points with their scaling efficiency taken from the series' one-rank point where the sweep has one (strong:
    /// T_1 / (P T_P); weak: GFLOP/s_P / (P GFLOP/s_1), which is T_1 / T_P where the work grows as L, as for decode);
    /// otherwise the bench's own figure (its one-rank baseline from the same launch) stays.
    public static func withEfficiency(_ points: [ScalingPoint], mode: ScalingMode) -> [ScalingPoint] {
        points.map { p in
            var p = p
            guard let one = points.first(where: { $0.series == p.series && $0.ranks == 1 && (mode == .weak || $0.seqLen == p.seqLen) }) else { return p }
            switch mode {
            case .strong: p.efficiency = one.timeS / (Double(p.ranks) * p.timeS)
            case .weak:
                if let g = p.gflops, let g1 = one.gflops, g1 > 0 { p.efficiency = g / (Double(p.ranks) * g1) } else { p.efficiency = one.timeS / p.timeS }
            }
            return p
        }
    }

    public static let csvColumns = ["bench", "series", "algorithm", "layout", "causal", "direction", "ranks", "seq_len", "tokens_per_rank",
                                    "heads", "head_dim", "time_s", "tokens_per_s", "gflops", "efficiency", "overlap", "wait_s", "wait_min_s", "bytes_sent",
                                    "peak_rss_bytes"]

    /// One row per point, sorted by series then ranks; empty cells where a figure does not apply.
    public static func csv(_ points: [ScalingPoint]) -> String {
        func cell(_ v: Double?) -> String { v.map { String(format: "%.6g", $0) } ?? "" }
        func quoted(_ s: String) -> String { s.contains(",") || s.contains("\"") ? "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : s }
        var lines = [csvColumns.joined(separator: ",")]
        for p in points.sorted(by: { ($0.series, $0.ranks, $0.seqLen) < ($1.series, $1.ranks, $1.seqLen) }) {
            let row: [String] = [p.bench, p.series, p.algorithm, p.layout ?? "", p.causal.map { "\($0)" } ?? "", p.direction, "\(p.ranks)", "\(p.seqLen)",
                                 "\(p.seqLen / p.ranks)", "\(p.heads)", p.headDim.map { "\($0)" } ?? "", cell(p.timeS), cell(p.tokensPerS), cell(p.gflops),
                                 cell(p.efficiency), cell(p.overlap), cell(p.waitS), cell(p.waitMinS), p.bytesSent.map { "\($0)" } ?? "", p.peakRssBytes.map { "\($0)" } ?? ""]
            lines.append(row.map(quoted).joined(separator: ","))
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// The series of `points` as (name, [(x, y)]) for `x` and `y`, skipping points without a y.
    public static func series(_ points: [ScalingPoint], x: (ScalingPoint) -> Double, y: (ScalingPoint) -> Double?) -> [SVGPlot.Series] {
        Dictionary(grouping: points, by: \.series).sorted { $0.key < $1.key }.compactMap { name, ps in
            let xy = ps.compactMap { p in y(p).map { (x(p), $0) } }.sorted { $0.0 < $1.0 }
            return xy.isEmpty ? nil : SVGPlot.Series(name: name, points: xy)
        }
    }
}

extension String {
    /// camelCase to snake_case, as the JSON names are.
    var snakeCased: String {
        reduce(into: "") { out, c in if c.isUppercase { out += "_" + c.lowercased() } else { out.append(c) } }
    }
}

/// A line chart as SVG text: axes with ticks (linear, or log2/log10), one polyline with markers per series, a legend.
public enum SVGPlot {
    public struct Series: Sendable, Equatable {
        public var name: String
        public var points: [(Double, Double)]
        public init(name: String, points: [(Double, Double)]) { self.name = name; self.points = points }
        public static func == (a: Series, b: Series) -> Bool { a.name == b.name && a.points.elementsEqual(b.points) { $0 == $1 } }
    }

    public enum Scale: Sendable { case linear, log2, log10 }

    static let palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }

    static func format(_ v: Double) -> String {
        if v != 0 && (abs(v) >= 1e5 || abs(v) < 1e-2) { return String(format: "%.0e", v) }
        return v == v.rounded() ? String(format: "%.0f", v) : String(format: "%.2g", v)
    }

    /// Tick values over [lo, hi]: powers of the base for log scales, about six round steps for linear.
    static func ticks(_ lo: Double, _ hi: Double, _ scale: Scale) -> [Double] {
        switch scale {
        case .log2, .log10:
            let base = scale == .log2 ? 2.0 : 10.0
            let (a, b) = (Foundation.floor(Foundation.log(lo) / Foundation.log(base)), Foundation.ceil(Foundation.log(hi) / Foundation.log(base)))
            let step = Swift.max(1, Foundation.ceil((b - a) / 12))
            return stride(from: a, through: b, by: step).map { Foundation.pow(base, $0) }
        case .linear:
            let raw = (hi - lo) / 6
            let mag = Foundation.pow(10, Foundation.floor(Foundation.log10(Swift.max(raw, 1e-12))))
            let step = [1.0, 2, 2.5, 5, 10].map { $0 * mag }.first { $0 >= raw } ?? 10 * mag
            return stride(from: Foundation.floor(lo / step) * step, through: hi + step * 1e-9, by: step).map { $0 }
        }
    }

    /// The chart. `yRange` fixes the y axis (e.g. 0...1.1 for efficiency); otherwise it spans the data. Log scales
    /// need positive values: a series point that is not is an error.
    public static func render(title: String, xLabel: String, yLabel: String, series: [Series], xScale: Scale = .linear,
                              yScale: Scale = .linear, yRange: ClosedRange<Double>? = nil, reference: Double? = nil) throws -> String {
        let all = series.flatMap(\.points)
        guard !all.isEmpty else { throw SeqParError.invalidInput("nothing to plot for \"\(title)\": no series has a point") }
        for (x, y) in all {
            guard x.isFinite, y.isFinite else { throw SeqParError.invalidInput("\"\(title)\": a point (\(x), \(y)) is not finite") }
            if xScale != .linear && x <= 0 || yScale != .linear && y <= 0 {
                throw SeqParError.invalidInput("\"\(title)\": a point (\(x), \(y)) is not positive on a log axis")
            }
        }
        let (w, h) = (880.0, 460.0)
        let (left, right, top, bottom) = (70.0, 300.0, 40.0, 55.0)
        func t(_ v: Double, _ s: Scale) -> Double { s == .log2 ? Foundation.log2(v) : s == .log10 ? Foundation.log10(v) : v }
        var (x0, x1) = (all.map(\.0).min()!, all.map(\.0).max()!)
        var (y0, y1) = yRange.map { ($0.lowerBound, $0.upperBound) } ?? (all.map(\.1).min()!, all.map(\.1).max()!)
        if yRange == nil && yScale == .linear { y0 = Swift.min(y0, 0) }
        if x0 == x1 { (x0, x1) = xScale == .linear ? (x0 - 1, x1 + 1) : (x0 / 2, x1 * 2) }
        if y0 == y1 { (y0, y1) = yScale == .linear ? (y0 - 1, y1 + 1) : (y0 / 2, y1 * 2) }
        let xt = ticks(x0, x1, xScale), yt = ticks(y0, y1, yScale)
        if xScale != .linear { (x0, x1) = (Swift.min(x0, xt.first!), Swift.max(x1, xt.last!)) }
        if yRange == nil { (y0, y1) = (Swift.min(y0, yt.first!), Swift.max(y1, yt.last!)) }
        let (tx0, tx1, ty0, ty1) = (t(x0, xScale), t(x1, xScale), t(y0, yScale), t(y1, yScale))
        func px(_ x: Double) -> Double { left + (t(x, xScale) - tx0) / (tx1 - tx0) * (w - left - right) }
        func py(_ y: Double) -> Double { h - bottom - (t(y, yScale) - ty0) / (ty1 - ty0) * (h - top - bottom) }
        func n(_ v: Double) -> String { String(format: "%.1f", v) }
        var out = ["<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(w))\" height=\"\(Int(h))\" viewBox=\"0 0 \(Int(w)) \(Int(h))\" font-family=\"sans-serif\" font-size=\"12\">",
                   "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>",
                   "<text x=\"\(n(left))\" y=\"24\" font-size=\"15\">\(escape(title))</text>"]
        for v in xt where v >= x0 && v <= x1 {
            out.append("<line x1=\"\(n(px(v)))\" y1=\"\(n(top))\" x2=\"\(n(px(v)))\" y2=\"\(n(h - bottom))\" stroke=\"#e5e5e5\"/>")
            out.append("<text x=\"\(n(px(v)))\" y=\"\(n(h - bottom + 16))\" text-anchor=\"middle\">\(format(v))</text>")
        }
        for v in yt where v >= y0 - 1e-12 && v <= y1 + 1e-12 {
            out.append("<line x1=\"\(n(left))\" y1=\"\(n(py(v)))\" x2=\"\(n(w - right))\" y2=\"\(n(py(v)))\" stroke=\"#e5e5e5\"/>")
            out.append("<text x=\"\(n(left - 6))\" y=\"\(n(py(v) + 4))\" text-anchor=\"end\">\(format(v))</text>")
        }
        if let r = reference, r >= y0, r <= y1 {
            out.append("<line x1=\"\(n(left))\" y1=\"\(n(py(r)))\" x2=\"\(n(w - right))\" y2=\"\(n(py(r)))\" stroke=\"#888\" stroke-dasharray=\"4 3\"/>")
        }
        out.append("<rect x=\"\(n(left))\" y=\"\(n(top))\" width=\"\(n(w - left - right))\" height=\"\(n(h - top - bottom))\" fill=\"none\" stroke=\"#333\"/>")
        out.append("<text x=\"\(n((left + w - right) / 2))\" y=\"\(n(h - 12))\" text-anchor=\"middle\">\(escape(xLabel))</text>")
        out.append("<text transform=\"translate(16 \(n((top + h - bottom) / 2))) rotate(-90)\" text-anchor=\"middle\">\(escape(yLabel))</text>")
        for (i, s) in series.enumerated() {
            let color = palette[i % palette.count]
            let dash = i >= palette.count ? " stroke-dasharray=\"6 3\"" : ""
            let pts = s.points.map { "\(n(px($0.0))),\(n(py(Swift.min(Swift.max($0.1, y0), y1))))" }
            out.append("<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\"\(dash) points=\"\(pts.joined(separator: " "))\"/>")
            for p in pts { let c = p.split(separator: ","); out.append("<circle cx=\"\(c[0])\" cy=\"\(c[1])\" r=\"3\" fill=\"\(color)\"/>") }
            let ly = top + 8 + Double(i) * 18
            out.append("<line x1=\"\(n(w - right + 12))\" y1=\"\(n(ly))\" x2=\"\(n(w - right + 32))\" y2=\"\(n(ly))\" stroke=\"\(color)\" stroke-width=\"2\"\(dash)/>")
            out.append("<text x=\"\(n(w - right + 38))\" y=\"\(n(ly + 4))\">\(escape(s.name))</text>")
        }
        out.append("</svg>")
        return out.joined(separator: "\n") + "\n"
    }
}
