// The documentation cannot rot: the README's Swift example is Examples/RingAttention/main.swift byte for byte and the
// built example runs; the README stays short; every relative link (and #anchor) in the repository's Markdown resolves;
// `seqpar --version` names a version that CHANGELOG.md describes and the commit the binary was built from.
// (The CLI reference in docs/cli/ is checked by `docs/cli/generate --check`, which CI runs after the tests.)
import Foundation
import Testing

@Suite struct DocumentationTests {
    static let root = Harness.root

    static func text(_ path: String) throws -> String {
        try String(contentsOf: root.appendingPathComponent(path), encoding: .utf8)
    }

    /// The contents of every fenced block that opens with "```swift" in `markdown`.
    static func swiftBlocks(_ markdown: String) -> [String] {
        var blocks: [String] = [], current: [Substring]?
        for line in markdown.split(separator: "\n", omittingEmptySubsequences: false) {
            if current == nil, line == "```swift" { current = [] }
            else if current != nil, line == "```" { blocks.append(current!.joined(separator: "\n") + "\n"); current = nil }
            else if current != nil { current!.append(line) }
        }
        return blocks
    }

    @Test func readmeExampleIsTheCompiledExample() throws {
        let blocks = Self.swiftBlocks(try Self.text("README.md"))
        let example = try Self.text("Examples/RingAttention/main.swift")
        #expect(blocks.count == 1, "README.md should have one ```swift block (the example), has \(blocks.count)")
        #expect(blocks.first == example,
                "README.md's Swift example differs from Examples/RingAttention/main.swift: copy the file into the README's ```swift block")
    }

    @Test func exampleRuns() throws {
        let binary = URL(fileURLWithPath: Harness.binary).deletingLastPathComponent().appendingPathComponent("ring-attention-example").path
        try #require(FileManager.default.isExecutableFile(atPath: binary), "\(binary) not built: run `swift build` first")
        let r = try Harness.run([binary], timeout: 120)
        #expect(r.status == 0 && !r.timedOut, "the README's example failed:\n\(r.output)")
        #expect(r.output.contains("ring attention on 4 ranks: max relative error against the Double oracle"), "\(r.output)")
        #expect(r.output.components(separatedBy: "tokens, o [1, 128, 4, 64]").count == 5, "\(r.output)")
    }

    @Test func readmeIsShort() throws {
        let bytes = try Data(contentsOf: Self.root.appendingPathComponent("README.md")).count
        #expect(bytes <= 12_000, "README.md is \(bytes) bytes; keep it at most 12,000 (details go to docs/)")
    }

    /// Every Markdown file of the repository (not build outputs or dependencies).
    static func markdownFiles() -> [String] {
        let skip: Set<String> = [".build", ".git", ".device", ".devpack", ".swiftpm"]
        var out: [String] = []
        guard let e = FileManager.default.enumerator(atPath: root.path) else { return [] }
        while let path = e.nextObject() as? String {
            let name = (path as NSString).lastPathComponent
            if skip.contains(name) || name.hasPrefix(".build") { e.skipDescendants(); continue }
            if path.hasSuffix(".md") { out.append(path) }
        }
        return out.sorted()
    }

    /// GitHub's anchors for the headings of `markdown`: lower case, punctuation dropped, spaces to hyphens, "-1", "-2"
    /// for repeats.
    static func anchors(_ markdown: String) -> Set<String> {
        var seen: [String: Int] = [:], out: Set<String> = []
        var fenced = false
        for line in markdown.split(separator: "\n") {
            if line.hasPrefix("```") { fenced.toggle(); continue }
            guard !fenced, line.hasPrefix("#"), let space = line.firstIndex(of: " "), line[..<space].allSatisfy({ $0 == "#" }) else { continue }
            var title = String(line[line.index(after: space)...])
            title = title.replacingOccurrences(of: #"\[([^\]]*)\]\([^)]*\)"#, with: "$1", options: .regularExpression)
            let slug = String(title.lowercased().unicodeScalars.compactMap { c -> Character? in
                if c == " " { return "-" }
                if c == "-" || c == "_" || CharacterSet.alphanumerics.contains(c) { return Character(c) }
                return nil
            })
            let n = seen[slug, default: 0]
            seen[slug] = n + 1
            out.insert(n == 0 ? slug : "\(slug)-\(n)")
        }
        return out
    }

    /// The link targets of `markdown` outside code: inline links and images `[text](target)`, and references `[x]: target`.
    static func links(_ markdown: String) -> [String] {
        var out: [String] = [], fenced = false
        let inline = try! NSRegularExpression(pattern: #"\]\(([^)\s]+)(?:\s+"[^"]*")?\)"#)
        let reference = try! NSRegularExpression(pattern: #"^\s*\[[^\]]+\]:\s+(\S+)"#)
        for line in markdown.split(separator: "\n") {
            if line.hasPrefix("```") { fenced.toggle(); continue }
            if fenced { continue }
            // drop code spans
            let text = String(line).replacingOccurrences(of: "`[^`]*`", with: "", options: .regularExpression)
            let range = NSRange(text.startIndex..., in: text)
            for regex in [inline, reference] {
                for m in regex.matches(in: text, range: range) { out.append((text as NSString).substring(with: m.range(at: 1))) }
            }
        }
        return out
    }

    @Test func relativeLinksResolve() throws {
        let files = Self.markdownFiles()
        #expect(files.contains("README.md") && files.contains("docs/architecture.md"), "\(files)")
        var broken: [String] = []
        for file in files {
            let markdown = try Self.text(file)
            let dir = Self.root.appendingPathComponent(file).deletingLastPathComponent()
            for link in Self.links(markdown) {
                if link.contains("://") || link.hasPrefix("mailto:") { continue }
                let parts = link.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
                let path = parts[0].removingPercentEncoding ?? parts[0]
                let target = path.isEmpty ? Self.root.appendingPathComponent(file) : dir.appendingPathComponent(path)
                guard FileManager.default.fileExists(atPath: target.path) else { broken.append("\(file): \(link) (no such file)"); continue }
                if parts.count == 2, target.pathExtension == "md" {
                    let anchors = Self.anchors(try String(contentsOf: target, encoding: .utf8))
                    if !anchors.contains(parts[1]) { broken.append("\(file): \(link) (no heading with that anchor)") }
                }
            }
        }
        #expect(broken.isEmpty, "broken links:\n\(broken.joined(separator: "\n"))")
    }

    @Test func anchorsFollowGitHub() {
        #expect(Self.anchors("# SeqPar\n## Two commands\n### `seqpar attention` options, 2-16 ranks\n## Two commands\n")
                == ["seqpar", "two-commands", "seqpar-attention-options-2-16-ranks", "two-commands-1"])
        #expect(Self.links("see [a](docs/a.md#x) and ![p](b.svg \"t\"), `[not](code)`\n```\n[no](link)\n```\n[r]: c.md\n")
                == ["docs/a.md#x", "b.svg", "c.md"])
    }

    @Test func versionNamesReleaseAndCommit() throws {
        let r = try Harness.run([Harness.binary, "--version"], timeout: 30)
        #expect(r.status == 0, "\(r.output)")
        let line = r.output.trimmingCharacters(in: .whitespacesAndNewlines)
        let regex = try NSRegularExpression(pattern: #"^seqpar (\d+\.\d+\.\d+) \(commit ([0-9a-f]{7,}(-dirty)?|unknown|\S+)\)$"#)
        let match = try #require(regex.firstMatch(in: line, range: NSRange(line.startIndex..., in: line)), "seqpar --version printed \(line)")
        let version = (line as NSString).substring(with: match.range(at: 1))
        let commit = (line as NSString).substring(with: match.range(at: 2))
        #expect(try Self.text("CHANGELOG.md").contains("\n## \(version) "), "CHANGELOG.md has no section for \(version) (a line \"## \(version) ...\")")
        // Built in a git checkout without $SEQPAR_COMMIT: the hash is one of this repository's commits.
        if ProcessInfo.processInfo.environment["SEQPAR_COMMIT"] == nil, commit != "unknown",
           FileManager.default.fileExists(atPath: Self.root.appendingPathComponent(".git").path) {
            let hash = commit.replacingOccurrences(of: "-dirty", with: "")
            let git = try Harness.run(["git", "-C", Self.root.path, "cat-file", "-e", hash + "^{commit}"], timeout: 30)
            #expect(git.status == 0, "seqpar --version names commit \(hash), which this repository does not have")
        }
    }
}
