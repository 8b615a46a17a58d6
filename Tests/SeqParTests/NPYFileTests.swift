// .npy: round trips, every malformed-file case with its message, and random bytes (no crash, a clear error).
import Foundation
import PropertyBased
import Testing
@testable import SeqPar

/// A .npy file's bytes with a hand-written header dict and raw data.
func npyBytes(_ dict: String, data: [UInt8], version: UInt8 = 1) -> [UInt8] {
    var header = dict
    let preamble = version == 1 ? 10 : 12
    header += String(repeating: " ", count: (64 - (preamble + header.utf8.count + 1) % 64) % 64) + "\n"
    var bytes: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, version, 0]
    let n = header.utf8.count
    bytes += version == 1 ? [UInt8(n & 0xFF), UInt8(n >> 8)] : [UInt8(n & 0xFF), UInt8((n >> 8) & 0xFF), 0, 0]
    return bytes + Array(header.utf8) + data
}

func floatBytes(_ values: [Float]) -> [UInt8] { values.flatMap { v in withUnsafeBytes(of: v.bitPattern.littleEndian) { Array($0) } } }
func doubleBytes(_ values: [Double]) -> [UInt8] { values.flatMap { v in withUnsafeBytes(of: v.bitPattern.littleEndian) { Array($0) } } }

@Suite struct NPYFileTests {
    @Test(arguments: [[5], [2, 3], [2, 3, 4], [2, 1, 3, 2], [0, 4], [3, 0, 2]])
    func roundTrip(shape: [Int]) throws {
        let n = shape.reduce(1, *)
        let t = Tensor(shape: shape, values: (0..<n).map { Float($0) * 0.5 - 3 })
        let back = try NPY.decode(NPY.encode(t), file: "t.npy")
        #expect(back.shape == shape && back.toArray() == t.toArray())
        #expect((NPY.encode(t).count - 4 * n) % 64 == 0, "header padded to a multiple of 64 bytes")
    }

    @Test func float64IsReadAsFloat32AndVersion2Headers() throws {
        let t = try NPY.decode(npyBytes("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2), }", data: doubleBytes([1, -2.5, 3e10, 0.1])), file: "d.npy")
        #expect(t.shape == [2, 2] && t.toArray() == [1, -2.5, 3e10, Float(0.1)])
        let v2 = try NPY.decode(npyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", data: floatBytes([1, 2, 3]), version: 2), file: "v2.npy")
        #expect(v2.toArray() == [1, 2, 3])
    }

    @Test func fileRoundTrip() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("npy-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let t = Tensor(shape: [3, 2, 4], values: (0..<24).map(Float.init))
        let path = dir.appendingPathComponent("x.npy").path
        try NPY.write(t, to: path)
        #expect(try NPY.read(path).toArray() == t.toArray())
        #expect(throws: NPYError(file: dir.appendingPathComponent("missing.npy").path, problem: "no such file")) {
            _ = try NPY.read(dir.appendingPathComponent("missing.npy").path)
        }
    }

    static let malformed: [(name: String, bytes: [UInt8], phrase: String)] = {
        let six = floatBytes((0..<6).map(Float.init))
        let good = npyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", data: six)
        return [
            ("magic", [UInt8]("PK\u{3}\u{4}not npy at all".utf8), "not a .npy file"),
            ("empty", [], "not a .npy file"),
            ("header cut", Array(good.prefix(40)), "truncated"),
            ("data cut", Array(good.dropLast(5)), "truncated: shape (2, 3) of <f4 needs 24 bytes of data, the file has 19"),
            ("extra", good + [0, 0, 0, 0], "4 bytes after the data"),
            ("fortran", npyBytes("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", data: six), "Fortran-order"),
            ("int", npyBytes("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", data: six), "dtype '<i8' is not supported"),
            ("big-endian", npyBytes("{'descr': '>f4', 'fortran_order': False, 'shape': (6,), }", data: six), "big-endian"),
            ("rank 0", npyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", data: Array(six.prefix(4))), "rank 0"),
            ("rank 5", npyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 2, 3), }", data: six), "rank 5"),
            ("not a dict", npyBytes("descr <f4", data: six), "malformed header"),
            ("bad shape", npyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }", data: six), "shape entry 'x'"),
            ("no shape", npyBytes("{'descr': '<f4', 'fortran_order': False, }", data: six), "no 'shape' key"),
            ("version 9", [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, 9, 0, 0, 0], "unsupported .npy format version 9.0"),
            ("too big for float32", npyBytes("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", data: doubleBytes([1, 1e300])), "does not fit float32"),
            ("huge shape", npyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4), }", data: six), "too large"),
        ]
    }()

    @Test(arguments: malformed.indices) func malformedFilesAreRefused(index: Int) {
        let c = Self.malformed[index]
        do {
            _ = try NPY.decode(c.bytes, file: "\(c.name).npy")
            Issue.record("\(c.name): decoded a malformed file")
        } catch let e as NPYError {
            #expect(e.file == "\(c.name).npy")
            #expect(e.problem.contains(c.phrase), "\(c.name): \(e.problem)")
        } catch {
            Issue.record("\(c.name): unexpected error \(error)")
        }
    }

    /// Random bytes, and random cuts and byte flips of a valid file: decode or throw NPYError, never crash.
    @Test func randomBytesNeverCrash() async {
        let valid = npyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }", data: floatBytes((0..<6).map(Float.init)))
        await propertyCheck(count: 300, input: Gen.uint8().array(of: 0...200)) { bytes in
            #expect(decodesOrThrowsNPYError(bytes))
            #expect(decodesOrThrowsNPYError(valid.prefix(10) + bytes))
        }
        await propertyCheck(count: 300, input: Gen.int(in: 0...(valid.count - 1)), Gen.uint8(), Gen.int(in: 0...valid.count)) { at, byte, cut in
            var mutated = valid
            mutated[at] = byte
            #expect(decodesOrThrowsNPYError(Array(mutated.prefix(cut))))
            #expect(decodesOrThrowsNPYError(mutated))
        }
    }

    static let validFiles: [(name: String, bytes: [UInt8])] = [
        ("v1 f4 (3, 2)", npyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }", data: floatBytes((0..<6).map(Float.init)))),
        ("v2 f8 (2, 2, 2)", npyBytes("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2, 2), }", data: doubleBytes((0..<8).map(Double.init)), version: 2)),
        ("v3 f4 (4,)", npyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", data: floatBytes([1, 2, 3, 4]), version: 3)),
        ("v1 f4 (0, 4)", npyBytes("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }", data: [])),
    ]

    /// Every proper prefix of a valid file is refused as truncated (or, shorter than the preamble, as not a .npy
    /// file); only the whole file decodes.
    @Test(arguments: validFiles.indices) func everyTruncationIsRefused(index: Int) throws {
        let (name, bytes) = Self.validFiles[index]
        let preamble = bytes[6] == 1 ? 10 : 12
        for cut in 0..<bytes.count {
            do {
                let t = try NPY.decode(Array(bytes.prefix(cut)), file: "cut.npy")
                Issue.record("\(name) cut to \(cut) of \(bytes.count) bytes decoded as \(t.shape)")
            } catch let e as NPYError {
                let phrase = cut < 10 ? "not a .npy file" : "truncated"
                #expect(e.file == "cut.npy" && e.problem.contains(phrase), "\(name) cut to \(cut) (preamble \(preamble)): \(e.problem)")
            }
        }
        #expect(throws: Never.self) { try NPY.decode(bytes, file: "whole.npy") }
    }

    /// Headers assembled from random tokens of the dict's grammar (keys, dtypes, tuples with huge, negative and
    /// empty entries, stray quotes, non-ASCII, NUL), in every format version, with random amounts of data; and a
    /// valid header with one random span replaced by such tokens; and random header-length fields. Each decodes
    /// or throws an NPYError that names the file and says something; all of it in bounded time.
    @Test func randomHeadersFailClearly() async {
        let tokens = ["{", "}", "'descr'", "'fortran_order'", "'shape'", "'junk'", ":", ",", " ", "'<f4'", "'<f8'", "'>f4'", "'=f4'",
                      "'|u1'", "'<f2'", "'<c8'", "True", "False", "None", "(", ")", "(3,", "2)", "(3, 2)", "()", "(0,)", "(-1, 2)", "(2L, 3L)",
                      "(99999999999999999999,)", "(4294967296, 4294967296, 4294967296)", "(1, 1, 1, 1, 1)", "'", "\"", "\n", "\t", "\u{e9}",
                      "\u{0}", "x", "'descr': '<f4'", "'fortran_order': False", "'shape': (3, 2)", "{'descr': '<f4', "]
        func assemble(_ picks: [Int]) -> String { picks.map { tokens[$0] }.joined() }
        let clock = ContinuousClock()
        let start = clock.now
        await propertyCheck(count: 400, input: Gen.int(in: 0...(tokens.count - 1)).array(of: 0...14), Gen.int(in: 1...3), Gen.int(in: 0...7)) { picks, version, floats in
            let bytes = npyBytes(assemble(picks), data: floatBytes((0..<(floats == 7 ? 6 : floats)).map(Float.init)), version: UInt8(version))
            #expect(failsClearlyOrDecodes(bytes))
            #expect(failsClearlyOrDecodes(npyBytes("{" + assemble(picks) + "}", data: floatBytes([1, 2, 3, 4, 5, 6]), version: UInt8(version))))
        }
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }"
        await propertyCheck(count: 400, input: Gen.int(in: 0...(header.count - 1)), Gen.int(in: 0...8), Gen.int(in: 0...(tokens.count - 1)).array(of: 0...3)) { at, length, picks in
            var chars = Array(header)
            chars.replaceSubrange(at..<min(chars.count, at + length), with: Array(assemble(picks)))
            #expect(failsClearlyOrDecodes(npyBytes(String(chars), data: floatBytes((0..<6).map(Float.init)))))
        }
        let valid = Self.validFiles[0].bytes
        await propertyCheck(count: 300, input: Gen.uint8(), Gen.uint8()) { low, high in
            var v1 = valid
            (v1[8], v1[9]) = (low, high)
            #expect(failsClearlyOrDecodes(v1))
            var v2 = Self.validFiles[1].bytes
            (v2[8], v2[9], v2[10], v2[11]) = (low, high, high, low)
            #expect(failsClearlyOrDecodes(v2))
        }
        #expect(clock.now - start < .seconds(60), "the fuzzing took \(clock.now - start)")
    }

    /// Paths that are not regular files are refused before anything is read (a FIFO or /dev/zero would block or
    /// never end).
    @Test func specialFilesAreRefused() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("npy-special-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let fifo = dir.appendingPathComponent("fifo.npy").path
        #expect(mkfifo(fifo, 0o600) == 0)
        for (path, phrase) in [(fifo, "not a regular file"), ("/dev/zero", "not a regular file"), (dir.path, "is a directory")] {
            #expect(throws: NPYError.self) { _ = try NPY.read(path) }
            do { _ = try NPY.read(path) } catch let e as NPYError { #expect(e.problem.contains(phrase), "\(path): \(e.problem)") }
        }
        let empty = dir.appendingPathComponent("empty.npy").path
        #expect(FileManager.default.createFile(atPath: empty, contents: Data()))
        do { _ = try NPY.read(empty); Issue.record("an empty file decoded") } catch let e as NPYError {
            #expect(e.problem.contains("not a .npy file"), "\(e.problem)")
        }
    }
}

func decodesOrThrowsNPYError(_ bytes: [UInt8]) -> Bool {
    do { _ = try NPY.decode(bytes, file: "fuzz.npy"); return true } catch is NPYError { return true } catch { return false }
}

/// Decodes, or throws an NPYError naming the file with a non-empty problem; any other error is a failure.
func failsClearlyOrDecodes(_ bytes: [UInt8]) -> Bool {
    do { _ = try NPY.decode(bytes, file: "fuzz.npy"); return true } catch let e as NPYError {
        return e.file == "fuzz.npy" && e.problem.count > 8
    } catch { return false }
}
