//! Top-1 agreement of the quantized kernels' 8-bit activations with f32 activations, over
//! a text: `quant_agreement MODEL.gguf TEXT_FILE [CHUNK]`.
use veil_model::{LocalModel, Precision, QuantBundle, TokenModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let q = QuantBundle::load(std::path::Path::new(&args[1]))?;
    let text = std::fs::read_to_string(&args[2])?;
    let chunk: usize = args.get(3).map_or(Ok(256), |s| s.parse())?;
    let ids = q.text.tokenizer.encode(&text, false)?;
    let device = veil_model::Compute::cpu().device;
    let mut fast = LocalModel::quantized(&q.weights, &device, Some(chunk), Precision::Fast)?;
    let mut exact = LocalModel::quantized(&q.weights, &device, Some(chunk), Precision::Exact)?;
    let (mut agree, mut total, mut ties) = (0usize, 0usize, 0usize);
    let mut tops = Vec::new();
    for c in ids.chunks(chunk) {
        fast.reset();
        exact.reset();
        let f = fast.feed_all(c)?;
        let e = exact.feed_all(c)?;
        for (rf, re) in f.iter().zip(&e) {
            let mut sorted = re.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let top = veil_model::sampling::argmax(re);
            tops.push(format!("{top} {:.3}", sorted[0] - sorted[1]));
            total += 1;
            if veil_model::sampling::argmax(rf) == top {
                agree += 1;
            } else if sorted[0] - sorted[1] < 0.25 {
                ties += 1;
            }
        }
        let _ = fast.position();
    }
    if let Some(out) = args.get(4) {
        let ids_txt: Vec<String> = ids.iter().map(u32::to_string).collect();
        std::fs::write(out, format!("{}\n{}\n", ids_txt.join(" "), tops.join(",")))?;
    }
    println!(
        "{total} positions: top-1 agreement {agree} = {:.4}; of the {} disagreements, {ties} where the exact top two are within 0.25",
        agree as f64 / total as f64,
        total - agree
    );
    Ok(())
}
