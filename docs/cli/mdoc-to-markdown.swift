// Turns the mdoc pages that `swift package generate-manual --multi-page` writes (seqpar.1, seqpar.bench.kernel.1, ...)
// into Markdown: one page per command (seqpar-bench-kernel.md) and an index (README.md).
// usage: swift docs/cli/mdoc-to-markdown.swift PAGES_DIR OUT_DIR
//
// It reads the subset of mdoc that swift-argument-parser's generator emits: .Dd .Dt .Os (dropped: the date would make
// every regeneration differ), .Sh, .Nm, .Nd, .Ar, .Fl, .Op, .Oo/.Oc, .Bl/.It/.El, .Pp, .Ex -std, .Xr, text lines
// (escapes \e and \&), and fails on any other macro so that a new generator's output is noticed, not mangled.
import Foundation

struct Failure: Error, CustomStringConvertible { var description: String }

/// Splits a macro line's arguments: words, or "quoted strings" (\(dq is a quote inside one).
func arguments(_ line: Substring) -> [String] {
    var out: [String] = [], word = "", quoted = false, any = false
    var chars = Array(line), i = 0
    while i < chars.count {
        let c = chars[i]
        if c == "\"" { quoted.toggle(); any = true }
        else if c == " " && !quoted { if any { out.append(word) }; word = ""; any = false }
        else { word.append(c); any = true }
        i += 1
    }
    if any { out.append(word) }
    chars = []
    return out.map(unescape)
}

func unescape(_ s: String) -> String {
    s.replacingOccurrences(of: "\\(dq", with: "\"").replacingOccurrences(of: "\\&", with: "").replacingOccurrences(of: "\\e", with: "\\")
}

/// Renders inline macros (Fl, Ar, Op ...) of a synopsis or list-item line as plain command-line text: `Fl` prefixes a
/// dash to each following word, `Ar` wraps each in <>, until the next macro; punctuation attaches to the word before.
func inline(_ args: [String]) throws -> String {
    var parts: [String] = [], mode = "", i = 0
    func attach(_ p: String) { parts.append((parts.popLast() ?? "") + p) }
    while i < args.count {
        let a = args[i]
        switch a {
        case "Fl", "Ar": mode = a
        case "Op":
            parts.append("[" + (try inline(Array(args[(i + 1)...]))) + "]")
            i = args.count; continue
        case "Oo": parts.append("["); mode = ""
        case "Oc": attach("]"); mode = ""
        case ",", ".", ";", ":", "|": attach(a)
        case "Nm", "Ns", "Pa", "Cm", "Ic", "Sx", "Ql", "Dq", "Sq", "Em", "Sy", "Li", "Xr", "Bk", "Ek":
            throw Failure(description: "unsupported inline macro \(a)")
        default:
            let word = mode == "Fl" ? "-" + a : mode == "Ar" ? "<" + a + ">" : a
            // the generator writes `Ar name...` for a repeating argument: <name>... reads better than <name...>
            let w = word.replacingOccurrences(of: "...>", with: ">...")
            if parts.last == "[" { attach(w) } else { parts.append(w) }
        }
        i += 1
    }
    return parts.joined(separator: " ")
}

/// Escapes Markdown outside `code spans` (the help texts use backticks for commands).
func markdownText(_ s: String) -> String {
    var out = "", inCode = false
    for c in s {
        if c == "`" { inCode.toggle(); out.append(c); continue }
        if !inCode, "\\*_<[".contains(c) { out.append("\\") }
        out.append(c)
    }
    if let f = out.first, "#-+".contains(f) { out = "\\" + out }
    return out
}

func fileName(_ page: String) -> String { page.replacingOccurrences(of: ".", with: "-") + ".md" }

struct Page {
    var name = "", title = "", summary = ""
    var body: [String] = []
}

func convert(_ text: String, page: String) throws -> Page {
    var p = Page(name: page)
    var section = "", synopsis: [String] = [], listDepth = 0, inItem = false, pendingBreak = false, itemFirstText = false
    var seeAlso: [String] = []
    func emit(_ line: String) { p.body.append(line) }
    func indent() -> String { String(repeating: "  ", count: max(listDepth, 0)) }
    func flushSynopsis() {
        guard !synopsis.isEmpty else { return }
        emit("```text")
        emit(synopsis.joined(separator: " ").replacingOccurrences(of: "[ ", with: "[").replacingOccurrences(of: " ]", with: "]"))
        emit("```"); emit(""); synopsis = []
    }
    for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
        let line = raw.hasSuffix(" ") ? raw.dropLast() : raw
        if line.hasPrefix(".\\\"") || line.isEmpty { continue }
        guard line.hasPrefix(".") else {
            // a text line
            let t = markdownText(unescape(String(line)))
            if section == "NAME" { throw Failure(description: "text in NAME") }
            if inItem && itemFirstText { p.body[p.body.count - 1] += ": " + t; itemFirstText = false; continue }
            if pendingBreak { emit(""); pendingBreak = false }
            emit((inItem ? indent() : "") + t)
            continue
        }
        var args = arguments(line.dropFirst())
        let macro = args.removeFirst()
        switch macro {
        case "Dd", "Dt", "Os": break
        case "Sh":
            flushSynopsis()
            section = args.joined(separator: " ").uppercased()
            if section != "NAME" && section != "SYNOPSIS" && section != "SEE ALSO" {
                if p.body.last != "" && !p.body.isEmpty { emit("") }
                emit("## " + section.prefix(1) + section.dropFirst().lowercased()); emit("")
            }
        case "Nm":
            if section == "NAME" { p.title = args.joined(separator: " ") }
            else if section == "SYNOPSIS" { synopsis.append(args.isEmpty ? p.title : args.joined(separator: " ")) }
            else { throw Failure(description: ".Nm outside NAME and SYNOPSIS") }
        case "Nd": p.summary = args.joined(separator: " ")
        case "Ar", "Fl", "Op", "Oo", "Oc":
            guard section == "SYNOPSIS" else { throw Failure(description: ".\(macro) outside SYNOPSIS") }
            synopsis.append(try inline([macro] + args))
        case "Bl":
            if listDepth > 0 && itemFirstText { itemFirstText = false }
            if listDepth == 0 && p.body.last.map({ !$0.isEmpty }) == true { emit("") }
            listDepth += 1; pendingBreak = false
        case "El":
            listDepth -= 1; inItem = listDepth > 0; itemFirstText = false
            if listDepth == 0 { emit("") }
        case "It":
            guard listDepth > 0 else { throw Failure(description: ".It outside a list") }
            pendingBreak = false
            emit(String(repeating: "  ", count: listDepth - 1) + "- `" + (try inline(args)) + "`")
            inItem = true; itemFirstText = true
        case "Pp":
            if inItem { itemFirstText = false }
            pendingBreak = true
        case "Ex":
            guard args == ["-std"] else { throw Failure(description: ".Ex \(args)") }
            emit("`\(p.title.split(separator: " ").first ?? "")` exits 0 on success, and >0 if an error occurs."); emit("")
        case "Xr":
            guard args.count >= 2 else { throw Failure(description: ".Xr \(args)") }
            seeAlso.append("[\(args[0].replacingOccurrences(of: ".", with: " "))](\(fileName(args[0])))")
        default:
            throw Failure(description: "unsupported macro .\(macro)")
        }
    }
    flushSynopsis()
    // The synopsis comes right after the summary: move it there (it was emitted in order already, so nothing to do),
    // and the subcommands (SEE ALSO) go last.
    if !seeAlso.isEmpty {
        emit("## Subcommands"); emit("")
        for s in seeAlso { emit("- " + s) }
        emit("")
    }
    while p.body.last == "" { p.body.removeLast() }
    return p
}

let argv = CommandLine.arguments
guard argv.count == 3 else {
    FileHandle.standardError.write("usage: swift mdoc-to-markdown.swift PAGES_DIR OUT_DIR\n".data(using: .utf8)!)
    exit(64)
}
let (input, output) = (URL(fileURLWithPath: argv[1]), URL(fileURLWithPath: argv[2]))
do {
    let files = try FileManager.default.contentsOfDirectory(atPath: input.path).filter { $0.hasSuffix(".1") }.sorted()
    guard !files.isEmpty else { throw Failure(description: "no .1 pages in \(input.path)") }
    try FileManager.default.createDirectory(at: output, withIntermediateDirectories: true)
    var index: [Page] = []
    for f in files {
        let name = String(f.dropLast(2))
        let page = try convert(try String(contentsOf: input.appendingPathComponent(f), encoding: .utf8), page: name)
        let header = ["<!-- Generated by docs/cli/generate from seqpar's argument parser; do not edit. -->", "",
                      "# " + page.title, "", markdownText(page.summary), ""]
        try (header + page.body).joined(separator: "\n").appending("\n")
            .write(to: output.appendingPathComponent(fileName(name)), atomically: true, encoding: .utf8)
        index.append(page)
    }
    var lines = ["<!-- Generated by docs/cli/generate from seqpar's argument parser; do not edit. -->", "",
                 "# seqpar command-line reference", "",
                 "One page per command, generated from the argument parser (`swift package generate-manual`, then",
                 "`mdoc-to-markdown.swift`): run `docs/cli/generate` after changing an option or a help text, and commit the",
                 "result; CI (`.ci/run`) runs `docs/cli/generate --check`, which fails when these pages are out of date.",
                 "`seqpar <command> --help` prints the same text.", "",
                 "| command | what it does |", "|---|---|"]
    for p in index { lines.append("| [`\(p.title)`](\(fileName(p.name))) | \(markdownText(p.summary).replacingOccurrences(of: "|", with: "\\|")) |") }
    try (lines.joined(separator: "\n") + "\n").write(to: output.appendingPathComponent("README.md"), atomically: true, encoding: .utf8)
} catch {
    FileHandle.standardError.write("mdoc-to-markdown: \(error)\n".data(using: .utf8)!)
    exit(1)
}
