import ArgumentParser
import Foundation
import SeqPar

/// `seqpar report`: a scaling sweep's JSON lines as a CSV table and SVG plots.
struct ReportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report",
        abstract: "Turns a scaling sweep (the JSON lines of seqpar bench attention|latent --json) into a CSV table and SVG plots.",
        discussion: """
        Writes PREFIX.csv (one row per figure), PREFIX-efficiency.svg (scaling efficiency against ranks) and \
        PREFIX-time.svg (step time against L for weak scaling, against ranks for strong). launch/scaling calls it \
        after a sweep. A file that is empty, not JSON lines, or lacks a field is an error naming the line.
        """)

    @Argument(help: "JSON-lines files from the sweep.") var files: [String]
    @Option(help: "weak (tokens per rank fixed) or strong (L fixed).") var mode: ScalingMode
    @Option(help: "Output path prefix (PREFIX.csv, PREFIX-efficiency.svg, PREFIX-time.svg).") var out: String
    @Option(help: "A title for the plots.") var title: String?

    func validate() throws {
        guard !files.isEmpty else { throw ValidationError("give one or more JSON-lines files") }
    }

    func run() throws {
        try reportingErrors {
            let points = ScalingReport.withEfficiency(try files.flatMap(ScalingReport.load), mode: mode)
            let name = title ?? "\(mode.rawValue) scaling"
            let csv = ScalingReport.csv(points)
            // 0 to 1.2, or higher where a point is superlinear (never clipped).
            let top = max(1.2, (points.compactMap(\.efficiency).max() ?? 0) * 1.05)
            let efficiency = try SVGPlot.render(
                title: "\(name): efficiency", xLabel: "ranks", yLabel: "scaling efficiency",
                series: ScalingReport.series(points, x: { Double($0.ranks) }, y: \.efficiency), xScale: .log2, yRange: 0...top, reference: 1)
            let time = mode == .weak
                ? try SVGPlot.render(title: "\(name): step time", xLabel: "sequence length L (tokens per rank fixed)", yLabel: "step time (s)",
                                     series: ScalingReport.series(points, x: { Double($0.seqLen) }, y: \.timeS), xScale: .log2, yScale: .log10)
                : try SVGPlot.render(title: "\(name): step time", xLabel: "ranks (L fixed)", yLabel: "step time (s)",
                                     series: ScalingReport.series(points, x: { Double($0.ranks) }, y: \.timeS), xScale: .log2, yScale: .log10)
            let dir = URL(fileURLWithPath: out).deletingLastPathComponent()
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            for (suffix, text) in [(".csv", csv), ("-efficiency.svg", efficiency), ("-time.svg", time)] {
                try Data(text.utf8).write(to: URL(fileURLWithPath: out + suffix))
            }
            print("# \(points.count) figures in \(Set(points.map(\.series)).count) series -> \(out).csv, \(out)-efficiency.svg, \(out)-time.svg")
            let columns = [("series", 38), ("ranks", 6), ("L", 9), ("time_s", 11), ("efficiency", 11), ("overlap", 8)]
            print(columns.map { Report.pad($0.0, $0.1) }.joined())
            for p in points.sorted(by: { ($0.series, $0.ranks) < ($1.series, $1.ranks) }) {
                let cells = [p.series, "\(p.ranks)", "\(p.seqLen)", String(format: "%.4f", p.timeS),
                             p.efficiency.map { String(format: "%.2f", $0) } ?? "-", p.overlap.map { String(format: "%.0f%%", 100 * $0) } ?? "-"]
                print(zip(cells, columns).map { Report.pad($0, $1.1) }.joined())
            }
        }
    }
}

extension ScalingMode: ExpressibleByArgument {}
