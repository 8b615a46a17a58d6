// swift-tools-version:6.0
//
// SeqPar: sequence-parallel attention on MPI.
//   CMPI        system library over OpenMPI's mpi.h (a shim turns cast macros into getters)
//   COpenBLAS   system library over OpenBLAS's cblas.h
//   CDNNL       oneDNN's C API headers (the bf16 path; libdnnl is loaded at run time, see Tensor/OneDNN.swift)
//   SeqPar      tensors, communicator protocol + in-process cluster, kernels, algorithms (no MPI)
//   SeqParMPI   MPICommunicator, the only module that imports CMPI
//   seqpar      the command-line tool (the BuildInfo plugin records the commit it is built from: seqpar --version)
//   ring-attention-example   Examples/RingAttention: the README's Swift example, built and run by the tests
import Foundation
import PackageDescription

// The kernels' SIMD code (the polynomial exp, row max/sum/scale on SIMD16<Float>) is compiled for AVX2 + FMA
// (`-target-cpu haswell`: 256-bit vectors instead of SSE2's 128) when the building machine has them, as every
// x86-64 server since 2013 does: about 1.4x on the D=64 softmax kernel; and for AVX-512 where it has that too.
// SEQPAR_TARGET_CPU=generic builds for any x86-64 (a binary to copy to an older machine); another value is passed as
// the LLVM CPU name.
let targetCPU: String? = {
    if let cpu = ProcessInfo.processInfo.environment["SEQPAR_TARGET_CPU"] { return cpu == "generic" || cpu.isEmpty ? nil : cpu }
    #if arch(x86_64)
    guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
          let flags = info.split(separator: "\n").first(where: { $0.hasPrefix("flags") }) else { return nil }
    let set = Set(flags.split(separator: " "))
    // Everything `haswell` may emit: a VM that masks any of these gets a portable build instead of SIGILL.
    let needed = ["avx", "avx2", "fma", "bmi1", "bmi2", "abm", "movbe", "f16c", "popcnt"]  // abm: LZCNT
    guard needed.allSatisfy({ set.contains(Substring($0)) }) else { return nil }
    // AVX-512 (every Xeon since Skylake-SP): SIMD16<Float> in one 512-bit register instead of two. The bf16 kernels'
    // softmax (exponentials, rounding P to bf16) is then the smaller part: 1.6x on the bf16 forward kernel on the AMX
    // device (benchmarks/results/bf16/run-0b1cbf2). The device bundle is built elsewhere: SEQPAR_TARGET_CPU=skylake-avx512.
    let avx512 = ["avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"]
    return avx512.allSatisfy { set.contains(Substring($0)) } ? "skylake-avx512" : "haswell"
    #else
    return nil
    #endif
}()
// Both CPU names above have FMA: SEQPAR_FMA lets the kernels fuse their multiply-adds (VectorMath.multiplyAdd), which a
// generic x86-64 build must not (each would become a call to the C library's software fmaf).
let kernelSettings: [SwiftSetting] = targetCPU.map { [.unsafeFlags(["-target-cpu", $0]), .define("SEQPAR_FMA")] } ?? []

let package = Package(
    name: "SeqPar",
    products: [
        .executable(name: "seqpar", targets: ["seqpar"]),
        .library(name: "SeqPar", targets: ["SeqPar"]),
        .library(name: "SeqParMPI", targets: ["SeqParMPI"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/x-sheep/swift-property-based", from: "2.0.1"),
    ],
    targets: [
        .systemLibrary(
            name: "CMPI", path: "CMPI", pkgConfig: "ompi-c",
            providers: [.apt(["libopenmpi-dev"])]),
        .systemLibrary(
            name: "COpenBLAS", path: "Sources/COpenBLAS", pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]),
        // Headers only (Debian's libdnnl-dev ships no pkg-config file; they sit in /usr/include): SeqPar dlopens
        // libdnnl.so.2 when a bf16 kernel first runs, so fp32 runs need no oneDNN.
        .systemLibrary(
            name: "CDNNL", path: "Sources/CDNNL",
            providers: [.apt(["libdnnl-dev"])]),
        .target(name: "SeqPar", dependencies: ["COpenBLAS", "CDNNL"], swiftSettings: kernelSettings),
        .target(name: "SeqParMPI", dependencies: ["SeqPar", "CMPI"]),
        .executableTarget(
            name: "seqpar",
            dependencies: [
                "SeqPar", "SeqParMPI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            plugins: ["BuildInfo"]),
        .plugin(name: "BuildInfo", capability: .buildTool()),
        // The README's Swift example (Tests/SeqParMPITests/DocumentationTests.swift runs it and checks that the README shows
        // this file byte for byte).
        .executableTarget(name: "ring-attention-example", dependencies: ["SeqPar"], path: "Examples/RingAttention"),
        .testTarget(
            name: "SeqParTests",
            dependencies: [
                "SeqPar",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ]),
        // Launches the built `seqpar` binary under a real `mpirun`; depends on the executable so that
        // `swift test` builds it first.
        .testTarget(name: "SeqParMPITests", dependencies: ["seqpar", "ring-attention-example"]),
    ]
)
