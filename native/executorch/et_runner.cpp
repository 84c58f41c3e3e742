// edgepipe's native ExecuTorch runner: time a .pte without Python, write its outputs for the numeric check.
//
//   edgepipe_et_runner MODEL.pte --input FILE:DTYPE:D0xD1... [--input ...] --outputs DIR --runs N --warmup W
//
// Inputs are raw little-endian arrays (check.npz's, written by edgepipe/harness/native.py); DTYPE is int64, int32
// or float32. The first run's outputs go to DIR/output<i>.bin; then W untimed and N timed runs of Module::forward on
// the same inputs. One JSON object (edgepipe.native/1) goes to stdout: load, first run and warm-up times, every
// timed run, the memory plan's buffer sizes, resident-set numbers around the load (Linux /proc), and the outputs'
// files, dtypes and shapes. Errors: one line on stderr, "error: ...", exit 1 (2: usage).
// Built against the executorch pip wheel's prebuilt runtime by scripts/build_native_runner.sh.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::EValue;

namespace {

struct Input {
  std::string file;
  ScalarType type;
  std::vector<executorch::aten::SizesType> sizes;
  std::vector<char> data;
};

int fail(const std::string& message, int code = 1) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  return code;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// VmRSS / VmHWM from /proc/self/status in KiB, -1 where absent.
long status_kb(const char* field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  size_t n = std::strlen(field);
  while (std::getline(f, line)) {
    if (line.compare(0, n, field) == 0 && line.size() > n && line[n] == ':') return std::stol(line.substr(n + 1));
  }
  return -1;
}

bool parse_type(const std::string& name, ScalarType* type, size_t* bytes) {
  if (name == "int64") { *type = ScalarType::Long; *bytes = 8; return true; }
  if (name == "int32") { *type = ScalarType::Int; *bytes = 4; return true; }
  if (name == "float32") { *type = ScalarType::Float; *bytes = 4; return true; }
  return false;
}

const char* type_name(ScalarType type) {
  switch (type) {
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::Bool: return "bool";
    default: return "unknown";
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return fail("usage: edgepipe_et_runner MODEL.pte --input FILE:DTYPE:SHAPE --outputs DIR --runs N --warmup W", 2);
  std::string model = argv[1], outputs_dir;
  int runs = 50, warmup = 10;
  std::vector<Input> inputs;
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (i + 1 >= argc) return fail("flag " + arg + " needs a value", 2);
    std::string value = argv[++i];
    if (arg == "--runs") runs = std::stoi(value);
    else if (arg == "--warmup") warmup = std::stoi(value);
    else if (arg == "--outputs") outputs_dir = value;
    else if (arg == "--input") {
      size_t a = value.rfind(':'), b = value.rfind(':', a - 1);
      if (a == std::string::npos || b == std::string::npos) return fail("--input takes FILE:DTYPE:D0xD1..., got " + value, 2);
      Input in;
      in.file = value.substr(0, b);
      size_t bytes = 0;
      if (!parse_type(value.substr(b + 1, a - b - 1), &in.type, &bytes)) return fail("unknown dtype in " + value, 2);
      std::stringstream dims(value.substr(a + 1));
      std::string d;
      size_t count = 1;
      while (std::getline(dims, d, 'x')) { in.sizes.push_back(std::stoi(d)); count *= in.sizes.back(); }
      std::ifstream f(in.file, std::ios::binary);
      if (!f) return fail("cannot read input " + in.file);
      in.data.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
      if (in.data.size() != count * bytes) return fail("input " + in.file + " has " + std::to_string(in.data.size()) + " bytes, its shape needs " + std::to_string(count * bytes));
      inputs.push_back(std::move(in));
    } else return fail("unknown flag " + arg, 2);
  }
  if (runs < 1 || warmup < 0 || outputs_dir.empty()) return fail("need --outputs DIR, --runs >= 1, --warmup >= 0", 2);

  // The idle baseline: the runtime is linked in, nothing loaded. Reset VmHWM here where Linux allows it.
  bool reset = false;
  if (FILE* f = std::fopen("/proc/self/clear_refs", "w")) { reset = std::fputs("5", f) >= 0; std::fclose(f); }
  long baseline_kb = status_kb("VmRSS");
  double t0 = now_ms();
  Module module(model, Module::LoadMode::File);
  auto loaded = module.load_forward();
  if (loaded != executorch::runtime::Error::Ok) return fail("cannot load " + model + " (ExecuTorch error " + std::to_string(static_cast<int>(loaded)) + ")");
  double load_ms = now_ms() - t0;
  long loaded_kb = status_kb("VmRSS");
  auto meta = module.method_meta("forward");
  if (!meta.ok()) return fail("the program has no forward method");
  std::vector<long long> planned;
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) planned.push_back(meta->memory_planned_buffer_size(i).get());

  std::vector<executorch::extension::TensorPtr> tensors;
  std::vector<EValue> values;
  for (auto& in : inputs) {
    tensors.push_back(executorch::extension::from_blob(in.data.data(), in.sizes, in.type));
    values.emplace_back(tensors.back());
  }
  t0 = now_ms();
  auto first = module.forward(values);
  double first_ms = now_ms() - t0;
  if (!first.ok()) return fail("forward failed on the check inputs (ExecuTorch error " + std::to_string(static_cast<int>(first.error())) + ")");
  std::ostringstream outs;
  for (size_t i = 0; i < first->size(); ++i) {
    const auto& tensor = (*first)[i].toTensor();
    std::string file = outputs_dir + "/output" + std::to_string(i) + ".bin";
    std::ofstream(file, std::ios::binary).write(static_cast<const char*>(tensor.const_data_ptr()), tensor.nbytes());
    outs << (i ? "," : "") << "{\"file\":\"output" << i << ".bin\",\"dtype\":\"" << type_name(tensor.scalar_type()) << "\",\"shape\":[";
    for (size_t d = 0; d < static_cast<size_t>(tensor.dim()); ++d) outs << (d ? "," : "") << tensor.size(d);
    outs << "]}";
  }
  t0 = now_ms();
  for (int i = 0; i < warmup; ++i) if (!module.forward(values).ok()) return fail("forward failed in warm-up");
  double warmup_ms = now_ms() - t0;
  std::vector<double> samples(runs);
  for (int i = 0; i < runs; ++i) {
    double s = now_ms();
    auto r = module.forward(values);
    samples[i] = now_ms() - s;
    if (!r.ok()) return fail("forward failed in timed run " + std::to_string(i));
  }
  std::printf("{\"schema\":\"edgepipe.native/1\",\"runtime\":\"executorch\",\"load_ms\":%.6f,\"first_run_ms\":%.6f,"
              "\"warmup_total_ms\":%.6f,\"samples_ms\":[", load_ms, first_ms, warmup_ms);
  for (int i = 0; i < runs; ++i) std::printf("%s%.6f", i ? "," : "", samples[i]);
  std::printf("],\"planned_buffers_bytes\":[");
  for (size_t i = 0; i < planned.size(); ++i) std::printf("%s%lld", i ? "," : "", planned[i]);
  std::printf("],\"rss_baseline_kb\":%ld,\"rss_after_load_kb\":%ld,\"hwm_kb\":%ld,\"hwm_reset\":%s,\"outputs\":[%s]}\n",
              baseline_kb, loaded_kb, status_kb("VmHWM"), reset ? "true" : "false", outs.str().c_str());
  return 0;
}
