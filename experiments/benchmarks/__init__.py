"""Speed: SALE end to end and pass by pass against dense attention, kernel variants, the Mosaic GPU estimate
kernel, and a Llama-shaped model's prefill."""
