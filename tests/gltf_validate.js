// Validate a glTF/GLB file with the Khronos validator; prints the JSON report.
const fs = require("fs");
const validator = require("gltf-validator");
const data = new Uint8Array(fs.readFileSync(process.argv[2]));
validator.validateBytes(data).then(
  (report) => console.log(JSON.stringify(report)),
  (error) => { console.error(String(error)); process.exit(2); }
);
