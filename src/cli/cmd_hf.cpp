// `opdlm import-hf` and `opdlm export-hf`: Hugging Face model directories <-> opdlm model files.
// Both write their output atomically (temp sibling + rename), so a failure never leaves a partial
// output over an existing good one.
#include <boost/program_options.hpp>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "opdlm/base/build_info.hpp"
#include "opdlm/base/error.hpp"
#include "opdlm/io/hf.hpp"
#include "opdlm/io/model_file.hpp"

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace opdlm;

namespace {

int run_import_hf(const std::vector<std::string>& args) {
  po::options_description d("opdlm import-hf: Hugging Face Qwen3 directory -> opdlm model file");
  std::string from, out, dtype;
  d.add_options()("help", "show this help")
      ("from", po::value(&from)->required(), "HF directory: config.json + model.safetensors or sharded index")
      ("out", po::value(&out)->required(), "model file to write (.h5)")
      ("dtype", po::value(&dtype)->default_value("f32"), "weights dtype in the model file: f32 | bf16");
  po::variables_map vm;
  if (cli::parse_or_print_help(args, d, vm)) return cli::kExitOk;
  if (dtype != "f32" && dtype != "bf16") OPDLM_FAIL_AT("command line", "dtype", "expected f32 or bf16, got '", dtype, "'");
  model::Qwen3Weights w = io::import_hf(from, dtype == "bf16" ? DType::bf16 : DType::f32);
  // The original config.json travels along so export-hf can restore the fields opdlm does not model.
  nlohmann::json hf_config;
  std::ifstream in(fs::path(from) / "config.json");
  in >> hf_config;
  const nlohmann::json extra = {{"source", {{"format", "hf"}, {"dir", fs::absolute(from).lexically_normal().string()}}},
                                {"hf_config", hf_config},
                                {"opdlm_version", kVersion}};
  io::save_model(out, w, extra);
  std::cout << "imported " << w.tensors().size() << " tensors (" << w.numel() << " parameters, " << dtype_name(w.dtype())
            << ") from " << from << " into " << out << "\n";
  return cli::kExitOk;
}

int run_export_hf(const std::vector<std::string>& args) {
  po::options_description d("opdlm export-hf: opdlm model file -> Hugging Face Qwen3 directory");
  std::string model_path, out, dtype;
  int64_t shard_mb = 0;
  d.add_options()("help", "show this help")
      ("model", po::value(&model_path)->required(), "model file (.h5)")
      ("out", po::value(&out)->required(), "HF directory to write (replaced as a whole; tokenizer and other files in it are kept)")
      ("dtype", po::value(&dtype)->default_value("f32"), "safetensors dtype: f32 (lossless) | bf16 (round to nearest even)")
      ("shard-size-mb", po::value(&shard_mb)->default_value(0), "split into shards of at most N MiB (0: one model.safetensors)");
  po::variables_map vm;
  if (cli::parse_or_print_help(args, d, vm)) return cli::kExitOk;
  if (dtype != "f32" && dtype != "bf16") OPDLM_FAIL_AT("command line", "dtype", "expected f32 or bf16, got '", dtype, "'");
  if (shard_mb < 0) OPDLM_FAIL_AT("command line", "shard-size-mb", "must be >= 0, got ", shard_mb);
  io::HfExportOptions o;
  o.dtype = dtype == "bf16" ? io::StoreDType::bf16 : io::StoreDType::f32;
  o.shard_size_bytes = shard_mb << 20;
  const io::ModelFileInfo info = io::read_model_info(model_path);
  if (info.extra.is_object() && info.extra.contains("hf_config")) o.base_config = info.extra["hf_config"];
  model::Qwen3Weights w = io::load_model(model_path);
  io::export_hf(w, out, o);
  std::cout << "exported " << w.tensors().size() << " tensors (" << w.numel() << " parameters) from " << model_path
            << " to " << out << " as " << dtype << "\n";
  return cli::kExitOk;
}

}  // namespace

OPDLM_SUBCOMMAND("import-hf", "import a Hugging Face Qwen3 directory (safetensors) into a model file", run_import_hf);
OPDLM_SUBCOMMAND("export-hf", "export a model file as a Hugging Face directory (config.json + safetensors)", run_export_hf);
